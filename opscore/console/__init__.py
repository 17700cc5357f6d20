"""The operator console (DESIGN §13): server-rendered pages over the same store the API reads.

``GET /`` redirects to ``/console/``. Pages are Jinja2 templates rendered here
(:mod:`opscore.console.pages`); the browser runs one small script of ours,
``/static/console/console.js``, for what must be live or must send a request: a page region
re-renders from the server when the audit stream (``GET /v1/opscore/audit/stream``) says
something it shows changed, the audit page's feed follows the stream, and action buttons
send the very request the API documents (with the session cookie and an ``X-CSRF-Token``
header instead of a bearer key). Every asset is served by Ops-Core: the pages work offline
and their Content-Security-Policy allows nothing from another origin.
"""

from __future__ import annotations

from opscore.console.pages import install

__all__ = ["install"]
