"""``Client`` is generated from ``AsyncClient``: the committed ``_sync.py`` must be what the script writes."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT


def test_the_sync_client_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/unasync.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_transformation_drops_async_and_the_prefixes() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import unasync
    finally:
        sys.path.pop(0)
    source = '"""doc"""\n\nfrom __future__ import annotations\nimport asyncio\n\nclass AsyncThing:\n'
    source += "    async def __aenter__(self) -> AsyncThing:\n        await asyncio.sleep(0)\n"
    source += "        async for x in y.aiter_lines():\n            await z.aclose()\n"
    out = unasync.unasync(source).removeprefix(unasync.HEADER)
    assert "async" not in out and "await" not in out
    assert "class Thing:" in out and "def __enter__(self) -> Thing:" in out
    assert "time.sleep(0)" in out and "for x in y.iter_lines():" in out and "z.close()" in out
