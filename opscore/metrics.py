"""Prometheus metrics (DESIGN §11): what Ops-Core counts, with labels that stay bounded.

One :class:`Metrics` per app, on a registry of its own (tests build many apps in one process;
the global registry would refuse the second). prometheus_client renders the exposition from
metric families; the numbers behind them are plain dicts updated on the event loop, because
the recording calls sit on the hot path (every request, every committed record) and the
library's own metric objects take a lock per update (``docs/performance.md`` measured both).

No label takes an unbounded value: ``route`` is the route template (``/v1/opscore/agent/{agent_id}``,
never the raw path), ``method`` one of the HTTP methods (others are ``OTHER``), ``status`` a
three-digit code, ``machine``/``event`` come from the declarations (anything else is
``other``), ``outcome`` and ``reason`` from small fixed vocabularies of the code that records them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class StoreBatches(Collector):
    """``opscore_store_batches_total{kind}`` and ``opscore_store_batch_items_total{kind}``: the store's own counts.

    The group commit (``commit``) and the coalesced reads (``read``, PostgreSQL) count their
    batches where they run; the scrape copies the counts here, so recording costs the hot path
    nothing. ``items / batches`` over a scrape interval is the mean batch: a store whose
    batches shrink to one pays each transaction's fixed cost (round trips, planning, an fsync)
    per change.
    """

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}

    def set(self, counts: dict[str, tuple[int, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily(
            "opscore_store_batches",
            "Batches the store ran: group commits (kind=commit) and coalesced reads (kind=read)",
            labels=["kind"],
        )
        items = CounterMetricFamily(
            "opscore_store_batch_items",
            "What those batches carried: changes committed (kind=commit), entities read (kind=read)",
            labels=["kind"],
        )
        for kind, (n, carried) in sorted(self.counts.items()):
            batches.add_metric([kind], n)
            items.add_metric([kind], carried)
        yield batches
        yield items


def _declared_states(machine: str) -> set[str]:
    return {s if isinstance(s, str) else s["name"] for s in MACHINES[machine]["states"]}


class _Counter:
    """A labelled counter kept as plain numbers: recording is a dict update, no lock.

    Every recording call and every scrape runs on the app's event loop thread, so nothing
    here is shared between threads; prometheus_client's own ``Counter`` takes a lock per
    increment, which costs several times more (docs/performance.md, "Micro-costs").
    """

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(list(key), value)
        return family


class _Histogram:
    """A labelled histogram kept as plain numbers: one bucket found by bisection, no lock."""

    def __init__(self, name: str, documentation: str, labels: list[str], buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labels, self.bounds = name, documentation, labels, buckets
        self.rows: dict[tuple[str, ...], list[float]] = {}
        """Per label set: a count per bucket (``+Inf`` last, not cumulative), then the sum."""

    def row(self, key: tuple[str, ...]) -> list[float]:
        found = self.rows.get(key)
        if found is None:
            found = self.rows[key] = [0.0] * (len(self.bounds) + 2)
        return found

    def observe(self, row: list[float], value: float) -> None:
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for key, row in self.rows.items():
            cumulative, buckets = 0.0, []
            for edge, count in zip(edges, row[:-1], strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(list(key), buckets, row[-1])
        return family


class _Families(Collector):
    def __init__(self, *families: _Counter | _Histogram) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


class Metrics:
    """The counters and histograms of one app, and the cheap calls that record into them."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.transitions = _Counter(
            "opscore_transitions",
            "Audit records committed (applied and refused transitions), by machine, event and outcome",
            ["machine", "event", "outcome"],
        )
        self.http_requests = _Counter(
            "opscore_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
        )
        self.http_duration = _Histogram(
            "opscore_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream: its whole life), by route template",
            ["method", "route"],
            HTTP_BUCKETS,
        )
        self.store_commit = _Histogram(
            "opscore_store_commit_seconds",
            "Time the engine waits for the store to commit a change or a batch of changes "
            "(SQLite: queueing in the group commit included)",
            [],
            COMMIT_BUCKETS,
        )
        self.dispatches = _Counter(
            "opscore_dispatches",
            "Workflow task dispatches to AgentKit, by outcome (accepted, unknown_agent, unreachable)",
            ["outcome"],
        )
        self.auth_denied_total = _Counter(
            "opscore_auth_denied",
            "Requests refused for their credentials (401) or their key's scopes (403), by reason",
            ["reason"],
        )
        self.entities = EntityCounts()
        self.store_batches = StoreBatches()
        registry.register(
            _Families(
                self.transitions,
                self.http_requests,
                self.http_duration,
                self.store_commit,
                self.dispatches,
                self.auth_denied_total,
            )
        )
        registry.register(self.entities)
        registry.register(self.store_batches)
        self._events = _events()
        self._transition_keys: dict[tuple[Any, ...], tuple[str, ...]] = {}
        self._request_keys: dict[tuple[str, str | None, int], tuple[tuple[str, ...], list[float]]] = {}
        self._commit_row = self.store_commit.row(())

    # -- recording (hot paths: keep each a look-up and an increment) -------------------------------

    def transition(self, record: dict[str, Any], entity: Any = None) -> None:
        """An engine listener: one committed audit record."""
        raw = (record["entityType"], record["event"], record["outcome"])
        key = self._transition_keys.get(raw)
        if key is None:
            key = self._transition_keys[raw] = self._transition_labels(*raw)
        self.transitions.inc(key)

    def _transition_labels(self, machine: str, event: str | None, outcome: str) -> tuple[str, str, str]:
        events = self._events.get(machine)
        shown_outcome = outcome if outcome in ("applied", "rejected") else OTHER
        if events is None:
            return OTHER, OTHER, shown_outcome
        return machine, "none" if event is None else event if event in events else OTHER, shown_outcome

    def request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """One answered HTTP request (called where the access line is written)."""
        raw = (method, route, status)
        found = self._request_keys.get(raw)
        if found is None:
            shown_method = method if method in METHODS else "OTHER"
            shown_route = UNMATCHED if route is None else route
            shown_status = str(status) if 100 <= status <= 599 else OTHER
            found = self._request_keys[raw] = (
                (shown_method, shown_route, shown_status),
                self.http_duration.row((shown_method, shown_route)),
            )
        self.http_requests.inc(found[0])
        self.http_duration.observe(found[1], seconds)

    def commit(self, seconds: float) -> None:
        """One store commit as the engine waited for it."""
        self.store_commit.observe(self._commit_row, seconds)

    def dispatched(self, outcome: str) -> None:
        """One dispatch to AgentKit and how it ended (``accepted``, ``unknown_agent``, ``unreachable``)."""
        self.dispatches.inc((outcome if outcome in ("accepted", "unknown_agent", "unreachable") else OTHER,))

    def auth_denied(self, reason: str) -> None:
        """One request refused for its credentials or scopes; ``reason`` is a short fixed word
        (``missing_key``, ``invalid_key``, ``bad_signature``, ``forbidden``, ...), never client text."""
        self.auth_denied_total.inc((reason,))

    # -- the scrape ----------------------------------------------------------------------------------

    def render(
        self,
        entity_counts: dict[tuple[str, str], int],
        batch_counts: dict[str, tuple[int, int]] | None = None,
    ) -> bytes:
        """The Prometheus text exposition, with ``opscore_entities`` as the store counted it just now."""
        self.entities.set(entity_counts)
        self.store_batches.set(batch_counts or {})
        return generate_latest(self.registry)
