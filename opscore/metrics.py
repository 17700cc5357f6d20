"""Prometheus metrics (DESIGN §11): what Ops-Core counts, with labels that stay bounded.

One :class:`Metrics` per app, on a registry of its own (tests build many apps in one process;
the global registry would refuse the second). The recording calls sit on the hot path (every
request, every committed record), so each one is a dict look-up of a cached child and an
``inc``/``observe``: the cost is measured in ``docs/performance.md``.

No label takes an unbounded value: ``route`` is the route template (``/v1/opscore/agent/{agent_id}``,
never the raw path), ``method`` one of the HTTP methods (others are ``OTHER``), ``status`` a
three-digit code, ``machine``/``event`` come from the declarations (anything else is
``other``), ``outcome`` and ``reason`` from small fixed vocabularies of the code that records them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from opscore.audit import METADATA_EVENT
from opscore.machines import MACHINES

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
"""The ``route`` of a request no route matched (a 404 for an unknown path): one label, not one per path."""
OTHER = "other"

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _events() -> dict[str, frozenset[str]]:
    """Every event a record of each machine can name: its triggers, and a metadata update."""
    return {
        name: frozenset({t["trigger"] for t in decl["transitions"]} | {METADATA_EVENT})
        for name, decl in MACHINES.items()
    }


class EntityCounts(Collector):
    """``opscore_entities{machine,state}``: counted by the store at scrape time, not kept in memory.

    The scrape route asks the store (one ``GROUP BY``) and hands the answer to :meth:`set`
    just before rendering; every declared state is listed, at 0 when nothing is in it.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def set(self, counts: dict[tuple[str, str], int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "opscore_entities",
            "Entities in each state of each machine, counted by the store",
            labels=["machine", "state"],
        )
        counts = self.counts
        for machine, decl in MACHINES.items():
            for state in decl["states"]:
                name = state if isinstance(state, str) else state["name"]
                family.add_metric([machine, name], counts.get((machine, name), 0))
        for (machine, state), n in counts.items():  # a state stored before it was removed from a declaration
            if machine not in MACHINES or state not in _declared_states(machine):
                family.add_metric([OTHER if machine not in MACHINES else machine, state], n)
        yield family


def _declared_states(machine: str) -> set[str]:
    return {s if isinstance(s, str) else s["name"] for s in MACHINES[machine]["states"]}


class Metrics:
    """The counters and histograms of one app, and the cheap calls that record into them."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call] # no `_created` series beside every counter: half the scrape, no use here
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.transitions = Counter(
            "opscore_transitions",
            "Audit records committed (applied and refused transitions), by machine, event and outcome",
            ["machine", "event", "outcome"],
            registry=registry,
        )
        self.http_requests = Counter(
            "opscore_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "opscore_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream: its whole life), by route template",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.store_commit = Histogram(
            "opscore_store_commit_seconds",
            "Time the engine waits for the store to commit a change or a batch of changes "
            "(SQLite: queueing in the group commit included)",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.dispatches = Counter(
            "opscore_dispatches",
            "Workflow task dispatches to AgentKit, by outcome (accepted, unknown_agent, unreachable)",
            ["outcome"],
            registry=registry,
        )
        self.auth_denied_total = Counter(
            "opscore_auth_denied",
            "Requests refused for their credentials (401) or their key's scopes (403), by reason",
            ["reason"],
            registry=registry,
        )
        self.entities = EntityCounts()
        registry.register(self.entities)
        self._events = _events()
        self._transition_children: dict[tuple[Any, ...], Any] = {}
        self._request_children: dict[tuple[str, str | None, int], tuple[Any, Any]] = {}
        self._commit_observe = self.store_commit.observe

    # -- recording (hot paths: keep each a look-up and an increment) -------------------------------

    def transition(self, record: dict[str, Any], entity: Any = None) -> None:
        """An engine listener: one committed audit record."""
        key = (record["entityType"], record["event"], record["outcome"])
        child = self._transition_children.get(key)
        if child is None:
            child = self._transition_children[key] = self.transitions.labels(*self._transition_labels(*key))
        child.inc()

    def _transition_labels(self, machine: str, event: str | None, outcome: str) -> tuple[str, str, str]:
        events = self._events.get(machine)
        if events is None:
            return OTHER, OTHER, outcome if outcome in ("applied", "rejected") else OTHER
        shown = "none" if event is None else event if event in events else OTHER
        return machine, shown, outcome if outcome in ("applied", "rejected") else OTHER

    def request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """One answered HTTP request (called where the access line is written)."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            shown_method = method if method in METHODS else "OTHER"
            shown_route = UNMATCHED if route is None else route
            shown_status = str(status) if 100 <= status <= 599 else OTHER
            children = self._request_children[key] = (
                self.http_requests.labels(shown_method, shown_route, shown_status),
                self.http_duration.labels(shown_method, shown_route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def commit(self, seconds: float) -> None:
        """One store commit as the engine waited for it."""
        self._commit_observe(seconds)

    def dispatched(self, outcome: str) -> None:
        """One dispatch to AgentKit and how it ended (``accepted``, ``unknown_agent``, ``unreachable``)."""
        self.dispatches.labels(outcome if outcome in ("accepted", "unknown_agent", "unreachable") else OTHER).inc()

    def auth_denied(self, reason: str) -> None:
        """One request refused for its credentials or scopes; ``reason`` is a short fixed word
        (``missing_key``, ``invalid_key``, ``bad_signature``, ``forbidden``, ...), never client text."""
        self.auth_denied_total.labels(reason).inc()

    # -- the scrape ----------------------------------------------------------------------------------

    def render(self, entity_counts: dict[tuple[str, str], int]) -> bytes:
        """The Prometheus text exposition, with ``opscore_entities`` as the store counted it just now."""
        self.entities.set(entity_counts)
        return generate_latest(self.registry)
