"""Logging: one JSON object per line on stdout, through python-json-logger (DESIGN §8).

Every line has the same shape, whoever logs it (Ops-Core, uvicorn, a library):
``{"time", "level", "logger", "message", ...fields}``, ``time`` in ISO-8601 UTC with
microseconds (``2026-11-30T13:22:01.123456+00:00``, the form audit records use), and never an
ANSI colour code (uvicorn's ``color_message`` extra is dropped). Audit records reach the log as
``"message": "transition"`` plus the record's fields; each HTTP request as one ``"message":
"request"`` line (:func:`access_line`). Keys and secrets never do (nothing here logs headers or
settings).

Three things keep logging off the hot path (measured in ``docs/performance.md``):

- A sealed record already carries its JSON text (``audit.Sealed``); :class:`JsonLines`
  splices it after the four logging fields instead of serialising the record again.
- Lines logged on every request (the access line, the transition line) skip the ``LogRecord``
  altogether when nothing but this module's handler would see it (:func:`direct`): they are
  written as text straight to its queue. Otherwise (a test's ``caplog``, another handler, a
  filter) they are made from a template ``LogRecord`` (:class:`LineMaker`) instead of
  ``Logger.makeRecord``, and go through ``logging`` as usual.
- Lines are written by a background thread (:class:`BackgroundHandler`): the event loop only
  formats and enqueues; the thread writes whatever has accumulated in one ``write`` and
  flushes. A ``kill -9`` can lose lines still queued, never an audit record (those are in
  the database before the transition is acknowledged); a SIGTERM loses none
  (``opscore serve`` calls :func:`shutdown` after uvicorn's last line).
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
from typing import IO, Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from opscore.clock import micros_text
from opscore.queues import take

LINGER_SECONDS = 0.005

DROPPED_EXTRAS = ("color_message",)
"""Extras never written: uvicorn puts an ANSI-coloured copy of its message in ``color_message``."""


class JsonLines(JsonFormatter):
    """python-json-logger's formatter, with a fast path for records carrying JSON text.

    ``logger.info("transition", extra={"audit": record, "opscore_json": text})`` writes
    ``{"time", "level", "logger", "message"}`` followed by the fields of the JSON object
    ``text``: the line ``extra=record`` would give, without a second serialisation and
    without copying 16 fields onto the ``LogRecord`` (other handlers find the record in
    ``record.audit``); both together nearly halve logging's cost per transition.
    ``time`` is ISO-8601 UTC on every line, whichever path formats it.
    """

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
        """The message as JSON; the few fixed messages ("transition") encoded once."""
        cache = self.__dict__.setdefault("_messages", {})
        encoded: str | None = cache.get(message)
        if encoded is None:
            encoded = json.dumps(message, ensure_ascii=False)
            if len(cache) < 256:
                cache[message] = encoded
        return encoded

    def _time(self, record: logging.LogRecord) -> str:
        """``record.created`` as the stored text of time (``clock.micros_text``), microseconds truncated."""
        created = record.created
        second = int(created)
        return micros_text(second * 1_000_000 + int((created - second) * 1_000_000))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """Every line's ``time``, fast path or not, in the one format."""
        return self._time(record)


class LineMaker:
    """Makes the ``LogRecord`` that ``logger.info(message, extra={"opscore_json": text})`` would.

    ``Logger.makeRecord`` derives the same dozen fields every time (file and module names by
    ``os.path`` calls, level name, process and thread facts). The first record is
    made by ``makeRecord`` and kept as a template; later ones copy it and set what differs (the
    times and the line's JSON text). The engine's ``_log_record`` does the same for audit lines.
    """

    def __init__(self, logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
        self.logger = logger
        self.message = message
        self.level = level
        self._template: dict[str, Any] = {}

    def __call__(self, text: str) -> logging.LogRecord:
        """A record whose line is ``{"time", "level", "logger", "message"}`` + the fields of ``text``."""
        if not self._template or logging.getLogRecordFactory() is not logging.LogRecord:
            made = self.logger.makeRecord(self.logger.name, self.level, __file__, 0, self.message, (), None)
            if logging.getLogRecordFactory() is not logging.LogRecord:  # someone customises records: respect it
                made.opscore_json = text
                return made
            self._template.update(made.__dict__)
        line = logging.LogRecord.__new__(logging.LogRecord)
        fields = line.__dict__
        fields.update(self._template)
        fields["created"] = created = time.time()
        fields["msecs"] = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes them
        fields["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
        fields["opscore_json"] = text
        return line


def direct(logger: logging.Logger) -> BackgroundHandler | None:
    """The handler to give ``logger``'s INFO lines to as text, or ``None`` when they must go through ``logging``.

    A line may skip the ``LogRecord`` only if the record would reach this module's handler
    and nothing else: no filter and no other handler on the way from ``logger`` to the root,
    the default record factory, and the handler still formatting with :class:`JsonLines`.
    Then the line is exactly what :meth:`JsonLines.format` would write for that record,
    without the record (about 5 µs of ``logging`` per line, twice a state report).
    Checked on every line: a handler added later (a test's ``caplog``) is seen at once.
    """
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    node: logging.Logger | None = logger
    while node is not None and node.parent is not None:  # every logger below the root
        if node.handlers or node.filters or node.disabled or not node.propagate:
            return None
        node = node.parent
    if node is None or node.filters or len(node.handlers) != 1:
        return None
    handler = node.handlers[0]
    if type(handler) is not BackgroundHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler if type(handler.formatter) is JsonLines else None


_heads: dict[tuple[str, str], str] = {}


def direct_line(logger: logging.Logger, message: str, text: str) -> bool:
    """Queue the line of ``logger.info(message, extra={"opscore_json": text})`` as text, if :func:`direct` allows.

    ``False`` when it does not: the caller logs the record through ``logging`` instead.
    """
    handler = direct(logger)
    if handler is None:
        return False
    head = _heads.get((logger.name, message))
    if head is None:  # the fields JsonLines.format writes after the time, for this logger and message
        level = logging.getLevelName(logging.INFO)
        head = _heads[(logger.name, message)] = (
            f'","level":"{level}","logger":"{logger.name}","message":{json.dumps(message, ensure_ascii=False)},'
        )
    handler.put_line('{"time":"' + micros_text(time.time_ns() // 1000) + head + text[1:])
    return True


access_log = logging.getLogger("opscore.access")
_access_record = LineMaker(access_log, "request")
_encoded: dict[str, str] = {}


def _json_text(value: str) -> str:
    """``value`` as a JSON string; the few values that repeat (methods, routes, key names) cached."""
    text = _encoded.get(value)
    if text is None:
        text = json.dumps(value, ensure_ascii=False)
        if len(_encoded) < 4096:
            _encoded[value] = text
    return text


def access_line(
    method: str,
    route: str | None,
    status: int,
    seconds: float,
    request_id: str,
    client_request_id: str | None,
    key_name: str | None,
) -> None:
    """Log one request: ``{"message": "request", "method", "route", "status", "durationMs", "requestId", ...}``.

    ``route`` is the route template (``/v1/opscore/agent/{agent_id}/state``, ``null`` when no
    route matched), never the raw path: no line per agent id, nothing a client typed.
    ``requestId`` is Ops-Core's own (hex, the one audit records carry); a client's
    ``X-Request-Id`` goes beside it as ``clientRequestId`` (encoded), so the line ties the two
    together without letting a client choose what the audit log says (its cost:
    ``docs/performance.md``).
    """
    client = (
        "" if client_request_id is None else f',"clientRequestId":{json.dumps(client_request_id, ensure_ascii=False)}'
    )
    text = (
        f'{{"method":{_json_text(method)},"route":{"null" if route is None else _json_text(route)},'
        f'"status":{status},"durationMs":{seconds * 1000:.3f},"requestId":"{request_id}"{client},'
        f'"keyName":{"null" if key_name is None else _json_text(key_name)}}}'
    )
    if not direct_line(access_log, "request", text):
        access_log.handle(_access_record(text))


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
        self.put_line(line)

    def put_line(self, line: str) -> None:
        """Queue a formatted line for the writer thread."""
        self._queued = next(self._counter)
        self._lines.put(line)

    def _run(self) -> None:
        while True:
            chunk, stop = take(self._lines)
            if chunk:
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


def _compact_dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, separators=(",", ":"), **kwargs)


def _is_ours(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_opscore", False))


def configure(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every ``logging`` record to ``stream`` (stdout) as one JSON line; idempotent.

    Called by ``opscore serve`` before uvicorn starts (so uvicorn's first lines are JSON too) and
    again by the app's lifespan: a second call for the same stream keeps the handler (and its
    queued lines) and only sets the level.
    """
    target = stream if stream is not None else sys.stdout
    root = logging.getLogger()
    ours = [h for h in root.handlers if _is_ours(h)]
    if len(ours) == 1 and isinstance(ours[0], BackgroundHandler) and ours[0].stream is target:
        handler = ours[0]
    else:
        for old in ours:
            root.removeHandler(old)
            old.close()
        handler = BackgroundHandler(target)
        handler.setFormatter(
            JsonLines(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                reserved_attrs=[*RESERVED_ATTRS, *DROPPED_EXTRAS],
                json_ensure_ascii=False,
                json_serializer=_compact_dumps,  # the separators of the fast path's lines
            )
        )
        handler._opscore = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # No line shows thread or process names: skip looking them up for every record
    # (a third of LogRecord's cost).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    # uvicorn's own lines go through the one handler above; its access lines (plain text with
    # the raw path) are replaced by ours (``opscore.access``), so they stay off.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def flush() -> None:
    """Write out every queued line (before reading the log in tests or benchmarks)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_opscore", False):
            handler.flush()


def shutdown() -> None:
    """Write out every queued line and stop the writer threads (the last thing a server does)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_ours(h)]:
        handler.flush()
        if isinstance(handler, BackgroundHandler):
            handler.close()
        root.removeHandler(handler)


@atexit.register
def _drain() -> None:
    flush()
