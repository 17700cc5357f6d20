"""The HTTP transport. ``opscore.api:app`` is the ASGI app (settings read at start-up)."""

from __future__ import annotations

from opscore.api.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
