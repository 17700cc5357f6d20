"""The JSON log line of every committed audit record (DESIGN §8), made cheaply.

Every record is logged as ``"message": "transition"`` plus the record's fields. The
``LogRecord`` is copied from a template instead of built by ``Logger.makeRecord`` (which
derives a dozen fields by ``os.path`` calls per line), and the record's JSON text made while
sealing it is spliced in by ``logs.JsonLines``; with no other handler or filter to see it, the
line skips the ``LogRecord`` (``logs.direct``). The cost is in ``docs/performance.md``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opscore import audit, logs

audit_log = logging.getLogger("opscore.audit")

_TEMPLATE: dict[str, Any] = {}


def _line(record: dict[str, Any]) -> logging.LogRecord:
    """The ``LogRecord`` ``audit_log.info("transition", extra=...)`` would make.

    The first one is made by ``makeRecord`` and kept as a template; later ones copy it and set
    what differs: the times and the two extras (``audit``, ``opscore_json``). A custom record
    factory (someone else's logging setup) gets the normal path.
    """
    if not _TEMPLATE or logging.getLogRecordFactory() is not logging.LogRecord:
        made = audit_log.makeRecord(audit_log.name, logging.INFO, __file__, 0, "transition", (), None, "transition")
        if logging.getLogRecordFactory() is not logging.LogRecord:
            made.audit = record
            made.opscore_json = audit.text_of(record)
            return made
        _TEMPLATE.update(made.__dict__)
    line = logging.LogRecord.__new__(logging.LogRecord)
    fields = line.__dict__
    fields.update(_TEMPLATE)
    fields["created"] = created = time.time()
    fields["msecs"] = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes them
    fields["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    fields["audit"] = record
    fields["opscore_json"] = audit.text_of(record)
    return line


def transition(record: dict[str, Any]) -> None:
    """Log one committed audit record as one JSON line."""
    if audit_log.isEnabledFor(logging.INFO) and not logs.direct_line(audit_log, "transition", audit.text_of(record)):
        audit_log.handle(_line(record))
