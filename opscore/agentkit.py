"""AgentKit's side of the wire: the registration webhook's signature (DESIGN §2).

AgentKit signs ``timestamp_header_bytes + b"." + raw_body`` with HMAC-SHA256 under
``OPSCORE_WEBHOOK_SECRET`` and sends the hex digest in ``X-AgentKit-Signature``; the real
AgentKit sends the timestamp as Unix epoch seconds (``"1732390000"``), ISO-8601 is accepted
too. Several secrets are tried so a secret can be rotated without downtime.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from datetime import UTC, datetime

from opscore.errors import BadSignature, BadTimestamp, StaleTimestamp, WebhookDisabled


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature AgentKit sends for ``body`` at ``timestamp``."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def parse_timestamp(value: str) -> float:
    """Epoch seconds (possibly fractional) or ISO-8601 (naive means UTC) → epoch seconds."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadTimestamp("X-AgentKit-Timestamp is neither epoch seconds nor ISO-8601") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def check_signature(
    secrets: tuple[bytes, ...],
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    now: float,
    window: float,
) -> tuple[float, str]:
    """Raise ``Unauthorized`` unless some secret signed ``body`` recently; (time, signature)."""
    if not secrets:
        raise WebhookDisabled()
    if not timestamp or not signature:
        raise BadSignature("X-AgentKit-Timestamp and X-AgentKit-Signature are required")
    sent = parse_timestamp(timestamp)
    if not math.isfinite(sent) or abs(now - sent) > window:  # "nan" passes any comparison
        raise StaleTimestamp(f"X-AgentKit-Timestamp is more than {window:g} s from now")
    presented = signature.strip().lower().removeprefix("sha256=")
    # compare bytes: compare_digest raises TypeError for str holding non-ASCII characters
    presented_bytes = presented.encode("utf-8", "surrogateescape")
    matched = False
    for secret in secrets:
        if hmac.compare_digest(sign(secret, timestamp, body).encode(), presented_bytes):
            matched = True
    if not matched:
        raise BadSignature("X-AgentKit-Signature does not match the body")
    return sent, presented
