"""How to use `transitions` per request: measured, so the engine's choice is not a guess.

    python -m benchmarks.machine_patterns

Compares, for one legal trigger on an agent whose state was just loaded from storage:
  per-request   build a Machine for the request (model=None), add the model, trigger
  add/remove    one shared Machine; add_model(obj, initial=state), trigger, remove_model
  probe         one shared Machine; machine.events[trigger].trigger(probe)  (Ops-Core's choice)
and the memory each approach keeps per agent when agents stay attached.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
import tracemalloc
from typing import Any

from transitions import Machine

from opscore.machines import AGENT


def _decl() -> dict[str, Any]:
    return {k: v for k, v in AGENT.items() if k not in ("name", "terminal")}


class Model:
    pass


class Probe:
    __slots__ = ("state",)

    def __init__(self, state: str) -> None:
        self.state = state


def per_request(n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        m = Machine(model=None, **_decl())
        obj = Model()
        m.add_model(obj, initial="idle" if i % 2 else "active")
        obj.trigger("begin_task" if i % 2 else "finish_task")  # type: ignore[attr-defined]
    return (time.perf_counter() - t0) / n


def add_remove(n: int) -> float:
    m = Machine(model=None, **_decl())
    t0 = time.perf_counter()
    for i in range(n):
        obj = Model()
        m.add_model(obj, initial="idle" if i % 2 else "active")
        obj.trigger("begin_task" if i % 2 else "finish_task")  # type: ignore[attr-defined]
        m.remove_model(obj)
    return (time.perf_counter() - t0) / n


def probe(n: int) -> float:
    m = Machine(model=None, **_decl())
    begin, finish = m.events["begin_task"], m.events["finish_task"]
    t0 = time.perf_counter()
    for i in range(n):
        if i % 2:
            begin.trigger(Probe("idle"))
        else:
            finish.trigger(Probe("active"))
    return (time.perf_counter() - t0) / n


def kept_bytes(kind: str, agents: int = 2000) -> float:
    gc.collect()
    tracemalloc.start()
    keep: list[Any] = []
    shared = Machine(model=None, **_decl())
    for _ in range(agents):
        if kind == "machine-per-agent":
            obj = Model()
            keep.append(Machine(model=obj, **_decl()))
        elif kind == "attached-to-shared":
            obj = Model()
            shared.add_model(obj, initial="idle")
            keep.append(obj)
        else:
            keep.append(Probe("idle"))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size / agents


def main() -> None:
    n = 20_000
    rows = {}
    for name, fn in (
        ("per-request Machine", per_request),
        ("add_model/remove_model", add_remove),
        ("events[].trigger(probe)", probe),
    ):
        runs = [fn(n // 4 if name.startswith("per") else n) for _ in range(5)]
        rows[name] = statistics.median(runs) * 1e6
    mem = {k: kept_bytes(k) for k in ("machine-per-agent", "attached-to-shared", "probe")}
    print(f"{'pattern':28} {'µs/transition':>14}")
    for name, us in rows.items():
        print(f"{name:28} {us:14.1f}")
    print(f"\n{'kept per agent':28} {'bytes':>14}")
    for name, b in mem.items():
        print(f"{name:28} {b:14.0f}")
    print(json.dumps({"us_per_transition": rows, "bytes_per_agent": mem}))


if __name__ == "__main__":
    main()
