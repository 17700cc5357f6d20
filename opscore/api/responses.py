"""``JsonAnswer``: the JSON response of every route that shows stored data.

orjson writes the same bytes as the stdlib for plain bodies (str/int/bool/None, dicts and
lists of them), five times faster. Two kinds of stored data cannot be written as JSON by
either encoder as they are: values stored before Ops-Core refused them (a NaN, nesting deeper
than orjson's 254 levels) and integers beyond 64 bits. Those go the stdlib way, with
non-finite numbers shown as ``null``: a view must always be valid JSON and must never fail
(the audit records themselves are served as stored, see ``api/paging.py``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from fastapi.responses import JSONResponse


def _finite(value: Any) -> Any:
    """``value`` with every NaN/±Infinity replaced by ``None`` (only on the rare fallback path)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class JsonAnswer(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except orjson.JSONEncodeError:
            return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
