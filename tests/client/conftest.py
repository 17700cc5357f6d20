"""One real ``opscore serve`` on SQLite per test module, with keys of every kind.

The client and the CLI are tested the way their users run them: over HTTP against a real
server process. Tests in a module share its server (each uses its own agent ids), so the
suite starts a handful of servers, not one per test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from opscore.client import Client
from opscore.keys import new_key
from tests.servers import Server, free_port

FAILING_DEFINITION = {
    "id": "fails-at-once",
    "version": "1",
    # pinned to an idle agent; AGENTKIT_API_URL points nowhere: the dispatch fails, no retry is left
    "tasks": [{"taskId": "only", "agentId": "t-failer", "maxRetries": 0, "timeoutSeconds": 1}],
}
TWO_STEPS = {
    "id": "two-steps",
    "name": "Summarise, then review",
    "version": "1.0",
    "tasks": [
        {"taskId": "summarise", "agentCapability": "summarise_text", "nextTaskId": "review", "maxRetries": 1},
        {"taskId": "review", "agentCapability": "review_text"},
    ],
}


@dataclass
class Live:
    """The server and a key of each kind (the admin key is ``server.api_key``)."""

    server: Server
    reader: str
    reporter: str  # report scope, agents summariser-* only
    folder: Path

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, key: str | None = None, **options: object) -> Client:
        return Client(self.url, key or self.server.api_key, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("live")
    reader, reader_entry = new_key("reader", ["read"])
    reporter, reporter_entry = new_key("summariser", ["report"], ["summariser-*"])
    keys_file = folder / "keys.json"
    keys_file.write_text(json.dumps([reader_entry, reporter_entry]), encoding="utf-8")
    server = Server(
        database_url=f"sqlite:///{folder / 'opscore.db'}",
        log_path=folder / "server.log",
        env={"OPSCORE_KEYS_FILE": str(keys_file), "AGENTKIT_API_URL": f"http://127.0.0.1:{free_port()}"},
    )
    server.start()
    yield Live(server, reader, reporter, folder)
    server.stop()


def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
