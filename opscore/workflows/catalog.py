"""The stored workflow definitions, each validated once and kept (an id+version never changes)."""

from __future__ import annotations

from typing import Any

from opscore.errors import UnknownDefinition
from opscore.storage.base import Store
from opscore.workflows.definitions import Definition, validate


class Catalog:
    def __init__(self, store: Store, *, default_timeout: float) -> None:
        self.store = store
        self.default_timeout = default_timeout
        self._known: dict[tuple[str, str], Definition] = {}

    async def publish(self, body: Any) -> tuple[Definition, bool]:
        """Validate and store a definition; ``(definition, created)``. 409 for another body."""
        definition = validate(body, default_timeout=self.default_timeout)
        created = await self.store.put_definition(definition.definition_id, definition.version, definition.body)
        self._known[(definition.definition_id, definition.version)] = definition
        return definition, created

    async def get(self, definition_id: str, version: str | None = None) -> Definition:
        """A stored definition (the one stored last without ``version``); 404 when there is none."""
        if version is not None and (definition_id, version) in self._known:
            return self._known[(definition_id, version)]
        body = await self.store.get_definition(definition_id, version)
        if body is None:
            which = f"{definition_id!r}" + ("" if version is None else f" version {version!r}")
            raise UnknownDefinition(f"no workflow definition {which}")
        definition = validate(body, default_timeout=self.default_timeout)
        self._known[(definition.definition_id, definition.version)] = definition
        return definition
