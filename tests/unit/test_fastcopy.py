"""The generated replacers copy every field, including ones added after they were written."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from opscore import engine
from opscore.fastcopy import replacer
from opscore.models import Change, Committed, Entity, IdempotencyEntry, Timer, TransitionResult
from opscore.storage import base


def _every_field_set(cls: type[Any]) -> Any:
    """An instance whose every field holds a value of its own (none left at its default)."""
    return cls(**{f.name: object() for f in dataclasses.fields(cls)})


@pytest.mark.parametrize(
    ("fn", "cls"),
    [(engine._finish, Change), (base._moved, Entity)],
    ids=["engine._finish(Change)", "base._moved(Entity)"],
)
def test_hot_path_replacers_equal_dataclasses_replace(fn: Any, cls: type[Any]) -> None:
    obj = _every_field_set(cls)
    names = fn.__code__.co_varnames[1 : fn.__code__.co_argcount]
    values = [object() for _ in names]
    fast = fn(obj, *values)
    slow = dataclasses.replace(obj, **dict(zip(names, values, strict=True)))
    for f in dataclasses.fields(cls):
        assert getattr(fast, f.name) is getattr(slow, f.name), f.name


def test_a_field_added_later_is_copied() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Grown:
        a: int
        b: int = 0
        added_later: str = "default"

    moved = replacer(Grown, "b")(Grown(1, 2, "kept"), 3)
    assert moved == Grown(1, 3, "kept")


def test_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError):
        replacer(Change, "no_such_field")


def test_next_entity_keeps_every_entity_field() -> None:
    """next_entity moves the fields a change touches and copies the rest (as replace() did)."""
    current = Entity(
        "agent",
        "a",
        "idle",
        revision=3,
        seq=4,
        head_hash="h" * 64,
        data={"x": 1},
        created_at="c",
        updated_at="u",
        last_seen_at="s",
        last_report_at="r",
        last_details={"d": 1},
    )
    change = Change("agent", "a", expected_revision=3, state="active", seen_at="s2", report_at="r2", details={})
    new, record, created = base.next_entity(current, change, now="n", record_id=None)
    assert record is None and not created
    assert new == dataclasses.replace(
        current,
        state="active",
        revision=4,
        updated_at="u",
        last_seen_at="s2",
        last_report_at="r2",
        last_details={},
    )
    for cls in (Change, Entity, IdempotencyEntry, Timer):
        assert all(f.init for f in dataclasses.fields(cls))


FAST = [Entity, Change, Committed, TransitionResult]


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_fast_init_equals_the_dataclass_init(cls: type[Any]) -> None:
    assert cls.__init__ is not cls.__dataclass_init__
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    values = {f.name: object() for f in fields}

    def slow(*args: Any, **kwargs: Any) -> Any:
        obj = object.__new__(cls)
        cls.__dataclass_init__(obj, *args, **kwargs)
        return obj

    every = [values[f.name] for f in fields]
    for fast_obj, slow_obj in [
        (cls(*every), slow(*every)),
        (cls(**values), slow(**values)),
        (cls(*[values[n] for n in required]), slow(*[values[n] for n in required])),
    ]:
        for f in fields:
            a, b = getattr(fast_obj, f.name), getattr(slow_obj, f.name)
            assert a == b and type(a) is type(b), f.name
    if any(f.default_factory is not dataclasses.MISSING for f in fields):
        one, two = cls(*[values[n] for n in required]), cls(*[values[n] for n in required])
        for f in fields:
            if f.default_factory is not dataclasses.MISSING:
                assert getattr(one, f.name) is not getattr(two, f.name)  # a fresh default each time
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls(*every).__setattr__(fields[0].name, 1)
    with pytest.raises(TypeError):
        cls(*every, object())
