"""What recording metrics costs on the state-report path, call by call (docs/performance.md).

    python -m benchmarks.metrics_cost

A state report records one request (counter + histogram), one transition (counter), one store
commit (histogram) and pokes the stream hub; each is timed alone over many calls, and the
four together, as one report does them.
"""

from __future__ import annotations

import json
import timeit

from prometheus_client import CollectorRegistry, Counter, Histogram

from opscore.api.streams import Hub
from opscore.metrics import Metrics

ROUTE = "/v1/opscore/agent/{agent_id}/state"
RECORD = {"entityType": "agent", "event": "begin_task", "outcome": "applied"}


def per_call_ns(statement: str, namespace: dict[str, object], number: int = 200_000, repeat: int = 5) -> float:
    best = min(timeit.repeat(statement, globals=namespace, number=number, repeat=repeat))
    return best / number * 1e9


def main() -> None:
    metrics = Metrics()
    hub = Hub(max_per_key=1, poll_seconds=1, ping_seconds=15, send_timeout_seconds=10)
    names = {"m": metrics, "hub": hub, "ROUTE": ROUTE, "RECORD": RECORD}
    results = {
        "request (counter + histogram)": per_call_ns("m.request('POST', ROUTE, 200, 0.0012)", names),
        "transition (counter)": per_call_ns("m.transition(RECORD)", names),
        "store commit (histogram)": per_call_ns("m.commit(0.0008)", names),
        "stream hub poke (no stream open)": per_call_ns("hub.poke(RECORD)", names),
        "one state report, all four": per_call_ns(
            "m.request('POST', ROUTE, 200, 0.0012); m.transition(RECORD); m.commit(0.0008); hub.poke(RECORD)", names
        ),
    }
    # the same four with prometheus_client's own metric objects (cached label children): what was replaced
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["a", "b", "c"], registry=registry).labels("POST", ROUTE, "200")
    histogram = Histogram("h", "h", ["a", "b"], registry=registry).labels("POST", ROUTE)
    transitions = Counter("t", "t", ["a", "b", "c"], registry=registry).labels("agent", "begin_task", "applied")
    commits = Histogram("s", "s", registry=registry)
    library = {"counter": counter, "histogram": histogram, "transitions": transitions, "commits": commits}
    results["with prometheus_client's objects, all four"] = per_call_ns(
        "counter.inc(); histogram.observe(0.0012); transitions.inc(); commits.observe(0.0008)", library
    )
    for name, ns in results.items():
        print(f"{name:40s} {ns:8.0f} ns")
    print(json.dumps({k: round(v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
