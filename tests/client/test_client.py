"""``opscore.client.Client`` against a real server: every method, its typed answer, every kind of error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import yaml

from opscore import errors, wire
from opscore.client import (
    AsyncClient,
    Client,
    IllegalTransition,
    NotFound,
    PreconditionFailed,
    Retry,
    ServerUnreachable,
    StaleReport,
    Unauthorized,
    UnknownEntity,
    UnknownState,
)
from tests.client.conftest import FAILING_DEFINITION, TWO_STEPS, Live, wait_until
from tests.servers import free_port


@pytest.fixture
def ops(live: Live) -> Iterator[Client]:
    with live.client() as client:
        yield client


# -- the service ---------------------------------------------------------------------------------


def test_health_ready_and_openapi(ops: Client) -> None:
    assert ops.health() == wire.HealthAnswer(status="ok", version=ops.health().version, store="sqlite")
    assert ops.ready().status == "ready"
    document = ops.openapi()
    assert "/v1/opscore/agent/{agent_id}/state" in document["paths"]


# -- agents --------------------------------------------------------------------------------------


def test_report_get_state_and_the_typed_answers(ops: Client) -> None:
    first = ops.agents.report("t-agent", "initializing", {"note": "booting"})
    assert isinstance(first, wire.StateReportAnswer)
    assert (first.agentId, first.previousState, first.state, first.changed, first.revision) == (
        "t-agent",
        "registered",
        "initializing",
        True,
        1,
    )
    again = ops.agents.report("t-agent", "initializing")  # a heartbeat
    assert (again.changed, again.auditId, again.revision) == (False, None, 1)
    agent = ops.agents.get("t-agent")
    assert isinstance(agent, wire.AgentView) and (agent.state, agent.revision) == ("initializing", 1)
    state = ops.agents.state("t-agent")
    assert isinstance(state, wire.AgentStateAtView) and state.state == "initializing" and state.at is None
    ops.agents.report("t-agent", "idle")
    first = next(iter(ops.agents.audit("t-agent")))
    then = ops.agents.state("t-agent", at=first.recordedAt)
    assert (then.state, then.revision, then.seq, then.asOfRecordId) == ("initializing", 1, 1, first.id)
    with pytest.raises(errors.NotYetCreated):
        ops.agents.state("t-agent", at=datetime.now(UTC) - timedelta(days=1))


def test_an_illegal_report_raises_with_the_allowed_states(ops: Client) -> None:
    ops.agents.report("t-illegal", "idle")
    with pytest.raises(IllegalTransition) as refused:
        ops.agents.report("t-illegal", "registered")
    err = refused.value
    assert (err.code, err.source, err.to) == ("illegal_transition", "idle", "registered")
    assert set(err.allowed) == {"initializing", "active", "error", "offline", "deregistered"}
    assert isinstance(err, errors.Refused) and "cannot go from" in err.detail
    assert any("HTTP 409" in note for note in err.__notes__)


def test_stale_unknown_state_and_if_match(ops: Client) -> None:
    now = datetime.now(UTC)
    ops.agents.report("t-stale", "idle", timestamp=now)
    with pytest.raises(StaleReport) as stale:
        ops.agents.report("t-stale", "active", timestamp=now - timedelta(seconds=5))
    assert stale.value.to == "active"
    with pytest.raises(UnknownState) as unknown:
        ops.agents.report("t-stale", "dancing")
    assert "idle" in unknown.value.valid
    with pytest.raises(PreconditionFailed) as precondition:
        ops.agents.report("t-stale", "active", if_match=99)
    assert precondition.value.code == "revision_mismatch"
    assert ops.agents.report("t-stale", "active", if_match=1).revision == 2


def test_trigger_register_and_report_many(ops: Client) -> None:
    registered = ops.agents.register(
        "t-reg", name="Summariser", version="2", capabilities=["summarise_text"], metadata={"team": "docs"}
    )
    assert (registered.state, registered.agentName, registered.capabilities) == (
        "registered",
        "Summariser",
        ["summarise_text"],
    )
    assert ops.agents.trigger("t-reg", "ready").state == "idle"
    with pytest.raises(IllegalTransition) as refused:
        ops.agents.trigger("t-reg", "finish_task")
    assert refused.value.allowed  # the states reachable from idle
    batch = ops.agents.report_many([{"agentId": "t-b1", "state": "idle"}, {"agentId": "t-b2", "state": "nope"}])
    assert isinstance(batch, wire.StateReportBatchAnswer)
    assert [r.status for r in batch.results] == [200, 422]


def test_list_walks_every_page_and_filters(ops: Client) -> None:
    for n in range(5):
        ops.agents.register(f"t-page-{n}", capabilities=["paging"])
    ids = [a.agentId for a in ops.agents.list(capability="paging", limit=2)]  # three pages of two
    assert ids == [f"t-page-{n}" for n in range(5)]
    assert all(isinstance(a, wire.AgentView) for a in ops.agents.list(capability="paging"))
    ops.agents.report("t-page-0", "idle")
    assert [a.agentId for a in ops.agents.list(state="idle", capability="paging")] == ["t-page-0"]


def test_agent_audit_and_diagram(ops: Client) -> None:
    for state in ("initializing", "idle", "active"):
        ops.agents.report("t-audit", state)
    with pytest.raises(IllegalTransition):
        ops.agents.report("t-audit", "registered")
    records = list(ops.agents.audit("t-audit", limit=1))  # a page per record
    assert [(r.seq, r.outcome) for r in records] == [(1, "applied"), (2, "applied"), (3, "applied"), (4, "rejected")]
    assert all(isinstance(r, wire.AuditRecord) for r in records)
    assert [r.seq for r in ops.agents.audit("t-audit", order="desc", outcome="applied")] == [3, 2, 1]
    text = ops.agents.diagram("t-audit", last=2)
    assert text.startswith("---") and "stateDiagram-v2" in text


def test_unknown_ids_raise_not_found(ops: Client) -> None:
    with pytest.raises(UnknownEntity) as missing:
        ops.agents.get("t-nobody")
    assert missing.value.code == "unknown_agent" and isinstance(missing.value, NotFound)
    with pytest.raises(NotFound):
        list(ops.agents.audit("t-nobody"))
    with pytest.raises(NotFound):
        ops.runs.get("no-such-run")
    with pytest.raises(errors.UnknownMachine) as machine:
        ops.machines.get("nope")
    assert "agent" in machine.value.valid


# -- keys ----------------------------------------------------------------------------------------


def test_a_wrong_key_is_unauthorized(live: Live) -> None:
    with live.client("not-a-key") as client, pytest.raises(Unauthorized) as refused:
        client.agents.get("anyone")
    assert refused.value.code == "unauthorized"


def test_a_key_without_the_scope_is_forbidden(live: Live, ops: Client) -> None:
    ops.agents.report("t-scoped", "idle")
    with live.client(live.reader) as reader:
        assert reader.agents.get("t-scoped").state == "idle"  # read: every GET
        with pytest.raises(errors.Forbidden) as refused:
            reader.agents.report("t-scoped", "active")
        assert refused.value.code == "forbidden"
    with live.client(live.reporter) as reporter:
        assert reporter.agents.report("summariser-1", "idle").state == "idle"  # inside its globs
        with pytest.raises(errors.Forbidden):
            reporter.agents.report("reviewer-1", "idle")  # outside them


# -- transitions: idempotency and retries --------------------------------------------------------


def test_the_same_idempotency_key_returns_the_first_answer(ops: Client) -> None:
    now = datetime.now(UTC)
    first = ops.agents.report("t-idem", "idle", timestamp=now, idempotency_key="key-1")
    second = ops.agents.report("t-idem", "idle", timestamp=now, idempotency_key="key-1")
    assert first == second and first.changed
    assert len(list(ops.agents.audit("t-idem"))) == 1
    with pytest.raises(errors.IdempotencyKeyReused):  # the same key for another request
        ops.agents.report("t-idem", "active", timestamp=now, idempotency_key="key-1")


class Flaky(httpx.BaseTransport):
    """Fails the first ``failures`` requests (a connection error, or a 503), then sends for real."""

    def __init__(self, failures: int, kind: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.failures = failures
        self.kind = kind
        self.seen: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if len(self.seen) <= self.failures:
            if self.kind == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            if self.kind == "read":  # sent and applied, but the answer is lost on the way back
                response = self.inner.handle_request(request)
                response.read()
                raise httpx.ReadError("connection reset", request=request)
            return httpx.Response(503, json={"detail": "storage unavailable", "code": "storage_unavailable"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("kind", ["connect", "read", "503"])
def test_a_transition_retries_with_the_same_key_and_applies_once(live: Live, kind: str) -> None:
    flaky = Flaky(2, kind)
    agent = f"t-retry-{kind}"
    with live.client(transport=flaky, retry=Retry(attempts=3, backoff=0.01)) as client:
        answer = client.agents.report(agent, "idle")
    assert answer.state == "idle" and answer.changed  # the first answer, even when it was lost
    assert len(flaky.seen) == 3
    keys = {r.headers["idempotency-key"] for r in flaky.seen}
    assert len(keys) == 1 and len(keys.pop()) == 32
    with live.client() as client:
        assert [r.event for r in client.agents.audit(agent)] == ["ready"]  # applied once


def test_reads_never_retry_and_retries_end(live: Live) -> None:
    flaky = Flaky(1, "connect")
    with live.client(transport=flaky, retry=Retry(attempts=3, backoff=0.01)) as client:
        with pytest.raises(ServerUnreachable):
            client.agents.get("anyone")
        assert len(flaky.seen) == 1
    flaky = Flaky(10, "503")
    quick = Retry(attempts=2, backoff=0.01)
    with live.client(transport=flaky, retry=quick) as client, pytest.raises(errors.Unavailable):
        client.agents.report("t-never", "idle")
    assert len(flaky.seen) == 3


def test_a_server_that_is_down_raises_server_unreachable() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "key", retry=Retry(attempts=1, backoff=0.01)) as client:
        with pytest.raises(ServerUnreachable) as down:
            client.agents.report("a", "idle")
        assert "cannot reach Ops-Core" in down.value.detail and isinstance(down.value, errors.Unavailable)
        with pytest.raises(ServerUnreachable):
            list(client.agents.list())


# -- definitions and runs ------------------------------------------------------------------------


def test_definitions_upload_list_get(ops: Client) -> None:
    stored = ops.definitions.upload(TWO_STEPS)
    assert isinstance(stored, wire.WorkflowDefinition) and stored.id == "two-steps"
    assert ops.definitions.upload(json.dumps(TWO_STEPS)).id == "two-steps"  # the same body again: 200
    as_yaml = yaml.safe_dump({**TWO_STEPS, "version": "2.0"})
    assert ops.definitions.upload(as_yaml).version == "2.0"
    assert ops.definitions.get("two-steps").version == "2.0"
    assert ops.definitions.get("two-steps", "1.0").name == "Summarise, then review"
    assert ("two-steps", "1.0") in [(d.id, d.version) for d in ops.definitions.list(limit=1)]
    with pytest.raises(errors.InvalidDefinition) as invalid:
        ops.definitions.upload({"id": "bad", "version": "1", "tasks": [{"taskId": "a", "nextTaskId": "zz"}]})
    assert invalid.value.problems
    with pytest.raises(errors.Refused) as taken:  # 409: a code this client has no class for gets its status's
        ops.definitions.upload({**TWO_STEPS, "name": "another body under the same id and version"})
    assert taken.value.code == "definition_exists"


def test_runs_start_list_get_move_audit_and_diagrams(ops: Client) -> None:
    ops.definitions.upload(TWO_STEPS)
    ops.agents.register("t-runner", capabilities=["summarise_text"])
    started = ops.runs.start("t-runner", "two-steps", version="1.0", payload={"document": "x"})
    assert isinstance(started, wire.RunStarted) and started.workflowId == "two-steps"
    session = started.sessionId
    run = ops.runs.get(session)
    assert isinstance(run, wire.RunView) and [t.taskId for t in run.tasks] == ["summarise", "review"]
    assert session in [r.sessionId for r in ops.runs.list(workflow_id="two-steps", agent_id="t-runner", limit=1)]
    assert ops.runs.pause(session).state == "paused"
    with pytest.raises(IllegalTransition) as refused:
        ops.runs.pause(session)
    assert refused.value.source == "paused"
    assert ops.runs.resume(session).state == "running"
    assert ops.runs.cancel(session, {"why": "test"}).state == "cancelled"
    events = [(r.entityType, r.event) for r in ops.runs.audit(session)]
    assert ("workflow", "pause") in events and ("workflow", "cancel") in events
    assert "stateDiagram-v2" in ops.runs.diagram(session, last=3)
    assert "flowchart" in ops.runs.diagram(session, view="tasks")
    assert "stateDiagram-v2" in ops.runs.task_diagram(session, "summarise")
    inline = ops.runs.start("t-runner", definition={**TWO_STEPS, "id": "inline-two", "version": "1"})
    assert inline.workflowId == "inline-two"


def test_a_failed_run_is_retried(ops: Client) -> None:
    ops.agents.report("t-failer", "idle")
    session = ops.runs.start("t-failer", definition=FAILING_DEFINITION).sessionId
    wait_until(lambda: ops.runs.get(session).state == "failed", timeout=15)
    retried = ops.runs.retry(session)
    assert isinstance(retried, wire.RunView)
    assert ("workflow", "retry", "applied") in [(r.entityType, r.event, r.outcome) for r in ops.runs.audit(session)]


# -- audit, machines, webhook --------------------------------------------------------------------


def test_audit_list_records_and_verify(ops: Client) -> None:
    ops.agents.report("t-log", "idle")
    rejected = list(ops.audit.list(entity_type="agent", outcome="rejected", limit=2))
    assert rejected and all(r.outcome == "rejected" and r.entityType == "agent" for r in rejected)
    ids = [r.id for r in ops.audit.list(limit=3)]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    newest = next(iter(ops.audit.list(order="desc", limit=1)))
    assert newest.id == max(ids)
    raw = [record for page in ops.audit.records(limit=50) for record in page]
    assert [r["id"] for r in raw] == ids and all(isinstance(r, dict) and "hash" in r for r in raw)
    verdict = ops.audit.verify()
    assert isinstance(verdict, wire.VerifyAnswer) and verdict.ok and verdict.records == len(raw)


def test_machines(ops: Client) -> None:
    machines = ops.machines.list()
    assert [m.name for m in machines] == ["agent", "workflow", "task"]
    agent = ops.machines.get("agent")
    assert agent.initial == "registered" and "deregistered" in agent.terminal
    assert "stateDiagram-v2" in ops.machines.diagram("agent")


def test_the_webhook_signed_as_agentkit_signs_it(live: Live, ops: Client) -> None:
    secret = live.server.webhook_secret
    details = {"agentId": "t-hook", "agentName": "Hooked", "capabilities": ["x"]}
    registered = ops.webhooks.notify("REGISTER", details, secret=secret)
    assert (
        isinstance(registered, wire.WebhookRegistered) and registered.created and registered.agent.agentName == "Hooked"
    )
    gone = ops.webhooks.notify("DEREGISTER", details, secret=secret)
    assert isinstance(gone, wire.WebhookDeregistered) and gone.state == "deregistered"
    with pytest.raises(Unauthorized):
        ops.webhooks.notify("REGISTER", details, secret="wrong")


def test_from_settings_reads_the_environment(live: Live, monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.chdir(str(tmp_path))
    monkeypatch.setenv("OPSCORE_API_URL", live.url)
    monkeypatch.setenv("OPSCORE_API_KEY", f"admin:{live.server.api_key}")  # a named key: its secret is sent
    with Client.from_settings() as client:
        assert client.base_url == live.url
        assert client.agents.report("t-env", "idle").state == "idle"


# -- the asynchronous twin -----------------------------------------------------------------------


def test_async_client_does_the_same(live: Live) -> None:
    async def scenario() -> None:
        async with AsyncClient(live.url, live.server.api_key) as ops:
            assert (await ops.health()).status == "ok"
            for n in range(3):
                await ops.agents.report(f"t-async-{n}", "idle")
            ids = [a.agentId async for a in ops.agents.list(state="idle", limit=1)]
            assert {"t-async-0", "t-async-1", "t-async-2"} <= set(ids)
            with pytest.raises(IllegalTransition) as refused:
                await ops.agents.report("t-async-0", "registered")
            assert "active" in refused.value.allowed
            records = [r async for r in ops.agents.audit("t-async-0")]
            assert [r.outcome for r in records] == ["applied", "rejected"]
            assert (await ops.audit.verify()).ok
            machines = await ops.machines.list()
            assert machines[0].name == "agent"

    asyncio.run(scenario())


def test_metrics_are_the_prometheus_scrape_and_move_with_a_report(ops: Client, live: Live) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def applied() -> dict[tuple[str, str], float]:
        families = {f.name: f for f in text_string_to_metric_families(ops.metrics())}
        return {
            (s.labels["machine"], s.labels["event"]): s.value
            for s in families["opscore_transitions"].samples
            if s.name == "opscore_transitions_total" and s.labels.get("outcome") == "applied"
        }

    # The shared server's sweeps may apply transitions of their own meanwhile (agents gone
    # quiet, workflow timers): only the series of this report's machine and event must move by one.
    before = applied()
    ops.agents.report("k-metrics", "idle")
    after = applied()
    event = next(iter(ops.agents.audit("k-metrics"))).event
    assert event is not None
    assert after[("agent", event)] == before.get(("agent", event), 0) + 1
    with live.client(live.reporter) as reporter, pytest.raises(errors.Forbidden):
        reporter.metrics()  # a report-only key has no read
