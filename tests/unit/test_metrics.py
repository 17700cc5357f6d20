"""``opscore.metrics`` kept as plain numbers: what the exposition says must be what was recorded."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from opscore.metrics import COMMIT_BUCKETS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render({}).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_buckets_are_cumulative_and_inclusive_at_their_bound() -> None:
    metrics = Metrics()
    for value in (0.0005, 0.001, 0.0011, 100.0):  # on a bound, just above it, past the last one
        metrics.commit(value)
    found = samples(metrics)

    def bucket(le: str) -> float:
        return found[("opscore_store_commit_seconds_bucket", (("le", le),))]

    assert bucket("0.0005") == 1 and bucket("0.001") == 2 and bucket("0.0025") == 3
    assert bucket(str(COMMIT_BUCKETS[-1])) == 3 and bucket("+Inf") == 4
    assert found[("opscore_store_commit_seconds_count", ())] == 4
    assert abs(found[("opscore_store_commit_seconds_sum", ())] - 100.0026) < 1e-9


def test_counters_keep_every_label_set_apart_and_bounded() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.transition({"entityType": "agent", "event": "ready", "outcome": "applied"})
    metrics.transition({"entityType": "agent", "event": "no-such-trigger", "outcome": "applied"})
    metrics.transition({"entityType": "robot", "event": "x", "outcome": "weird"})
    metrics.request("BREW", "/v1/opscore/agents", 200, 0.01)
    metrics.request("GET", None, 404, 0.01)
    metrics.dispatched("accepted")
    metrics.dispatched("exploded")
    metrics.auth_denied("forbidden")
    found = samples(metrics)
    transitions = "opscore_transitions_total"
    assert found[(transitions, (("event", "ready"), ("machine", "agent"), ("outcome", "applied")))] == 3
    assert found[(transitions, (("event", "other"), ("machine", "agent"), ("outcome", "applied")))] == 1
    assert found[(transitions, (("event", "other"), ("machine", "other"), ("outcome", "other")))] == 1
    requests = "opscore_http_requests_total"
    assert found[(requests, (("method", "OTHER"), ("route", "/v1/opscore/agents"), ("status", "200")))] == 1
    assert found[(requests, (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert found[("opscore_dispatches_total", (("outcome", "accepted"),))] == 1
    assert found[("opscore_dispatches_total", (("outcome", "other"),))] == 1
    assert found[("opscore_auth_denied_total", (("reason", "forbidden"),))] == 1
