"""Logging: one JSON object per line on stdout, through python-json-logger (DESIGN §8).

Audit records reach the log as ``"message": "transition"`` plus the record's fields; keys and
secrets never do (nothing here logs headers or settings).
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def configure(level: str = "INFO") -> None:
    """Send every ``logging`` record to stdout as one JSON line (idempotent)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_opscore", False)]:
        root.removeHandler(old)
    handler._opscore = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
