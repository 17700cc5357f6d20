"""Logging: one JSON object per line on stdout, through python-json-logger (DESIGN §8).

Audit records reach the log as ``"message": "transition"`` plus the record's fields; keys and
secrets never do (nothing here logs headers or settings).

Two things keep logging off the hot path (measured in ``docs/performance.md``):

- A sealed record already carries its JSON text (``audit.Sealed``); :class:`JsonLines`
  splices it after the four logging fields instead of serialising the record again.
- Lines are written by a background thread (:class:`BackgroundHandler`): the event loop only
  formats and enqueues; the thread writes whatever has accumulated in one ``write`` and
  flushes. A ``kill -9`` can lose lines still queued, never an audit record (those are in
  the database before the transition is acknowledged).
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import queue
import sys
import threading
import time
from typing import IO

from pythonjsonlogger.json import JsonFormatter

LINGER_SECONDS = 0.005


class JsonLines(JsonFormatter):
    """python-json-logger's formatter, with a fast path for records carrying JSON text.

    ``logger.info("transition", extra={"audit": record, "opscore_json": text})`` writes
    ``{"time", "level", "logger", "message"}`` followed by the fields of the JSON object
    ``text``: the line ``extra=record`` would give, without a second serialisation and
    without copying 16 fields onto the ``LogRecord`` (other handlers find the record in
    ``record.audit``); both together measured 11 against 4 µs per transition.
    """

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        text: str | None = record.__dict__.get("opscore_json")
        if text is None:
            return super().format(record)
        return (
            '{"time":"'
            + self._time(record)
            + '","level":"'
            + record.levelname
            + '","logger":"'
            + record.name
            + '","message":'
            + self._message(record.getMessage())
            + ","
            + text[1:]
        )

    def _message(self, message: str) -> str:
        """The message as JSON; the few fixed messages ("transition") encoded once (1 µs each)."""
        cache = self.__dict__.setdefault("_messages", {})
        encoded: str | None = cache.get(message)
        if encoded is None:
            encoded = json.dumps(message, ensure_ascii=False)
            if len(cache) < 256:
                cache[message] = encoded
        return encoded

    def _time(self, record: logging.LogRecord) -> str:
        """``formatTime`` (``2026-01-01 10:00:00,123``) with the per-second part computed once."""
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class BackgroundHandler(logging.Handler):
    """Formats on the caller's thread, writes on its own: no blocking I/O in the event loop."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._counter = itertools.count(1)
        self._queued = 0  # lines handed to the queue (next() on a count is atomic)
        self._written = 0  # lines written; only the writer thread updates it
        self._thread = threading.Thread(target=self._run, name="opscore-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging never breaks the caller
            self.handleError(record)
            return
        self._queued = next(self._counter)
        self._lines.put(line)

    def _run(self) -> None:
        lines = self._lines
        while True:
            first = lines.get()
            if first is None:
                return
            chunk = [first]
            stop = False
            while True:
                try:
                    nxt = lines.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                chunk.append(nxt)
            try:
                self.stream.write("\n".join(chunk) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stdout is gone (closed pipe): nothing left to tell
            self._written += len(chunk)
            if stop:
                return
            # Let lines gather: one wake-up and one write per 5 ms instead of one per line
            # (each wake-up is a GIL hand-off the event loop pays for).
            time.sleep(LINGER_SECONDS)

    def flush(self) -> None:
        """Wait until every line queued so far is written (tests, shutdown)."""
        target = self._queued
        while self._written < target and self._thread.is_alive():
            time.sleep(0.001)

    def close(self) -> None:
        self.flush()
        self._lines.put(None)
        self._thread.join(5)
        super().close()


def configure(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every ``logging`` record to stdout as one JSON line (idempotent)."""
    handler = BackgroundHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(
        JsonLines(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )
    )
    # No line shows thread or process names: skip looking them up for every record
    # (a third of LogRecord's cost).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_opscore", False)]:
        root.removeHandler(old)
        old.close()
    handler._opscore = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def flush() -> None:
    """Write out every queued line (before reading the log in tests or benchmarks)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_opscore", False):
            handler.flush()


@atexit.register
def _drain() -> None:
    flush()
