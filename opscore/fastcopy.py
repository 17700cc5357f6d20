"""``dataclasses.replace`` for the hot path, generated from the class's own fields.

``dataclasses.replace(obj, **changes)`` walks the fields, builds a keyword dict and calls
the frozen ``__init__`` with it: 2.2 µs for a :class:`~opscore.models.Change`, three times
a transition. :func:`replacer` writes, once per (class, changed fields), a function that
calls the constructor positionally with the changed values and every other field copied
from ``obj``: 1.1 µs. The argument list is generated from :func:`dataclasses.fields`, so a
field added to the class later is copied like the others, never dropped
(``tests/unit/test_fastcopy.py`` compares it with ``dataclasses.replace`` on every field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def replacer(cls: type[T], *names: str) -> Callable[..., T]:
    """``f(obj, v1, v2, ...)`` == ``dataclasses.replace(obj, name1=v1, name2=v2, ...)``."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    known = {f.name for f in fields}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    if any(not f.init for f in fields):
        raise TypeError(f"{cls.__name__} has init=False fields: use dataclasses.replace")
    args = ", ".join(f.name if f.name in names else f"obj.{f.name}" for f in fields)
    source = f"def replace(obj, {', '.join(names)}):\n    return cls({args})\n"
    namespace: dict[str, Any] = {}
    exec(source, {"cls": cls}, namespace)
    fn: Callable[..., T] = namespace["replace"]
    fn.__qualname__ = f"replace_{cls.__name__}_{'_'.join(names)}"
    return fn
