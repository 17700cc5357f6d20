"""Log lines written as text (``logs.direct``) are the lines ``logging`` writes, and step aside for anyone listening."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from opscore import audit, loglines, logs

ACCESS = ("POST", "/v1/opscore/agent/{agent_id}/state", 200, 0.0012, "0123456789abcdef", 'a "quoted" id\u2028', "ops")


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """Ops-Core's logging, writing to a buffer (the root's other handlers are set aside by :func:`alone`)."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    logs.configure("INFO", stream=stream)
    try:
        yield stream
    finally:
        logs.shutdown()
        root.setLevel(level)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Only Ops-Core's handler on the root, as in ``opscore serve`` (pytest adds its handlers per test phase)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [h for h in saved if logs._is_ours(h)]
    try:
        yield
    finally:
        root.handlers = saved


def written(stream: io.StringIO) -> list[dict[str, object]]:
    logs.flush()
    return [json.loads(line) for line in stream.getvalue().split("\n") if line]  # not splitlines(): U+2028 is text


def without_time(line: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in line.items() if k != "time"}


def through_logging(emit: object) -> None:
    """Run ``emit`` with a filter on the ``opscore`` logger that lets everything through: lines go the record way."""
    logger = logging.getLogger("opscore")
    keep = logging.Filter()
    logger.addFilter(keep)
    try:
        emit()  # type: ignore[operator]
    finally:
        logger.removeFilter(keep)


def sealed_record() -> dict[str, object]:
    record = {
        "id": 7,
        "entityType": "agent",
        "entityId": "a-1",
        "event": "begin_task",
        "outcome": "applied",
        "details": {"note": 'ünïcode \u2028 and "quotes"'},
    }
    return audit.seal(record, record_id=7, seq=1, prev_hash="", recorded_at="2026-12-01T17:00:00.000001+00:00")


def test_only_our_handler_listening_the_lines_skip_the_log_record(out: io.StringIO) -> None:
    with alone():
        assert logs.direct(logs.access_log) is not None
        assert logs.direct(loglines.audit_log) is not None
    assert logs.direct(logs.access_log) is None  # pytest's handlers are back on the root


def test_an_access_line_as_text_is_the_line_logging_writes(out: io.StringIO) -> None:
    before = datetime.now(UTC)
    with alone():
        logs.access_line(*ACCESS)
        through_logging(lambda: logs.access_line(*ACCESS))
    fast, slow = written(out)
    assert without_time(fast) == without_time(slow)
    assert fast["message"] == "request" and fast["clientRequestId"] == ACCESS[5]
    assert list(fast) == list(slow)  # the same fields in the same order
    moment = datetime.fromisoformat(str(fast["time"]))
    assert before - timedelta(seconds=1) <= moment <= datetime.now(UTC)
    assert str(fast["time"]).endswith("+00:00") and len(str(fast["time"])) == len("2026-11-30T13:22:01.123456+00:00")


def test_a_transition_line_as_text_is_the_line_logging_writes(out: io.StringIO) -> None:
    record = sealed_record()
    with alone():
        loglines.transition(record)
        through_logging(lambda: loglines.transition(record))
    fast, slow = written(out)
    assert without_time(fast) == without_time(slow)
    assert list(fast) == list(slow)
    assert fast["message"] == "transition" and fast["logger"] == "opscore.audit" and fast["level"] == "INFO"


def test_a_second_handler_a_filter_or_a_record_factory_gets_every_line_through_logging(
    out: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    with alone(), caplog.at_level(logging.INFO, logger="opscore.access"):
        logging.getLogger().addHandler(caplog.handler)
        assert logs.direct(logs.access_log) is None  # caplog's handler is on the root: it must see the line
        logs.access_line(*ACCESS)
    assert [r.getMessage() for r in caplog.records if r.name == "opscore.access"] == ["request"]

    dropped: list[str] = []

    def drop(record: logging.LogRecord) -> bool:
        dropped.append(record.getMessage())
        return False

    with alone():
        logs.access_log.addFilter(drop)
        try:
            assert logs.direct(logs.access_log) is None
            logs.access_line(*ACCESS)  # the filter sees the record and drops it
        finally:
            logs.access_log.removeFilter(drop)
    assert dropped == ["request"]

    made: list[str] = []
    default = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = default(*args, **kwargs)  # type: ignore[arg-type]
        made.append(record.getMessage())
        return record

    with alone():
        logging.setLogRecordFactory(factory)
        try:
            assert logs.direct(loglines.audit_log) is None
            loglines.transition(sealed_record())
        finally:
            logging.setLogRecordFactory(default)
    assert made == ["transition"]
    assert [line["message"] for line in written(out)] == ["request", "transition"]  # caplog's line and the factory's
