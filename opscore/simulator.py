"""A stand-in AgentKit that is a real HTTP server, and the simulated agents behind it.

``opscore simulate`` (or :func:`create_app`) serves what Ops-Core calls on AgentKit and plays
agents the way AgentKit and its SDK do (DESIGN §2):

- ``POST /v1/agents/register`` registers an agent and sends Ops-Core the signed registration
  webhook (``X-AgentKit-Timestamp`` = epoch seconds, ``X-AgentKit-Signature`` = hex
  HMAC-SHA256(secret, timestamp + b"." + raw body)); without a webhook secret it registers
  the agent through ``POST /v1/opscore/agents`` with the bearer key instead. With
  ``"simulate": true`` in the body the agent is also played by the simulator.
- ``POST /v1/agents/{id}/run`` answers 202 for a known agent (404 otherwise), records the call,
  and a simulated agent then reports ``active`` and, after ``latency`` seconds, ``idle`` with
  ``details.result`` (success) or ``error`` then ``idle`` (failure, with probability
  ``failureRate`` or as scripted). Reports go to ``POST /v1/opscore/agent/{id}/state`` with the
  Bearer key; like the real SDK they carry ``details: {}``-style bodies without a task id
  unless ``echoTaskId`` is on, and are never retried.
- ``N`` agents ``<prefix>-<i>`` are played from the start: each reports ``initializing``
  before its webhook (as the real AgentKit does), then ``idle``, then heartbeats.
- ``opscore_url`` may list several Ops-Core replicas, comma separated: reports and webhooks
  go to them in turn, and one that refuses the connection is skipped for the next (what a
  load balancer in front of replicas does; a request that reached a replica is never sent
  again, as the real SDK never retries).

Inspection and control for tests and demos: ``GET /calls`` (every ``/run`` call received,
with ``overlap: true`` when its agent was still working on an earlier task),
``DELETE /calls``, ``GET /agents``, ``POST /control`` (``latency``, ``failureRate``,
``runStatus`` to answer every ``/run`` with that HTTP status, ``echoTaskId``, per-agent
``scripts`` of outcomes ``ok``/``error``/``silent``), ``POST /agents/{id}/report``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from opscore.agentkit import sign

log = logging.getLogger("opscore.simulator")

OUTCOMES = ("ok", "error", "silent")


@dataclass
class SimConfig:
    opscore_url: str = "http://127.0.0.1:8000"
    api_key: str = ""
    webhook_secret: str = ""
    agents: int = 3
    prefix: str = "sim-agent"
    capabilities: list[str] = field(default_factory=lambda: ["summarise_text", "review_text"])
    latency: float = 0.2
    failure_rate: float = 0.0
    heartbeat: float = 30.0
    echo_task_id: bool = False
    seed: int | None = None


@dataclass
class SimAgent:
    agent_id: str
    name: str
    capabilities: list[str]
    simulated: bool
    state: str = "registered"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    script: list[str] = field(default_factory=list)
    runs: int = 0
    working: bool = False
    """Between a /run and the report that ends it: a second /run meanwhile is an overlap."""


class Simulator:
    """The state behind the app: agents, recorded calls, behaviour knobs."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.agents: dict[str, SimAgent] = {}
        self.calls: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        self.run_status: int | None = None
        self.random = random.Random(config.seed)
        self.client: httpx.AsyncClient | None = None
        self.background: set[asyncio.Task[Any]] = set()
        self.urls = [u.strip().rstrip("/") for u in config.opscore_url.split(",") if u.strip()]
        self.turn = 0

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.client is not None
        return self.client

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """POST to the next Ops-Core replica; a refused connection moves on to the one after."""
        self.turn += 1
        error: httpx.ConnectError | None = None
        for i in range(len(self.urls)):
            url = self.urls[(self.turn + i) % len(self.urls)]
            try:
                return await self.http.post(url + path, **kwargs)
            except httpx.ConnectError as exc:  # never reached that replica: safe to try another
                error = exc
        assert error is not None
        raise error

    async def report(self, agent: SimAgent, state: str, details: dict[str, Any] | None = None) -> int | None:
        """One state report as the SDK sends it; never retried. The HTTP status, or None."""
        body = {
            "agentId": agent.agent_id,
            "timestamp": datetime.now(UTC).isoformat(),
            "state": state,
            "details": details or {},
        }
        status: int | None = None
        agent.state = state  # the agent is in it from now, whatever becomes of the report
        try:
            response = await self.post(
                f"/v1/opscore/agent/{agent.agent_id}/state",
                json=body,
                headers={"Authorization": f"Bearer {self.config.api_key}"},
            )
            status = response.status_code
        except httpx.HTTPError as exc:
            log.warning("report failed", extra={"agentId": agent.agent_id, "state": state, "error": str(exc)})
        self.reports.append({"agentId": agent.agent_id, "state": state, "status": status, "at": time.time()})
        return status

    async def webhook(self, event_type: str, agent: SimAgent, metadata: dict[str, Any] | None = None) -> int:
        """AgentKit's signed registration webhook; without a webhook secret, the bearer-key API instead.

        ``docker compose up`` and ``opscore simulate`` need only ``OPSCORE_API_KEY``: with no
        ``OPSCORE_WEBHOOK_SECRET`` a REGISTER goes to ``POST /v1/opscore/agents`` (the same
        agent details) and a DEREGISTER to the agent's ``deregister`` trigger.
        """
        details = {
            "agentId": agent.agent_id,
            "agentName": agent.name,
            "version": "1.0",
            "capabilities": agent.capabilities,
            "contactEndpoint": f"http://simulator/{agent.agent_id}",
            "metadata": metadata or {"simulated": agent.simulated},
        }
        secret = self.config.webhook_secret.split(",")[0].strip()
        if not secret:
            bearer = {"Authorization": f"Bearer {self.config.api_key}"}
            if event_type == "REGISTER":
                response = await self.post("/v1/opscore/agents", json=details, headers=bearer)
            else:
                response = await self.post(
                    f"/v1/opscore/agent/{agent.agent_id}/transitions", json={"trigger": "deregister"}, headers=bearer
                )
            return response.status_code
        raw = json.dumps({"event_type": event_type, "agent_details": details}).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-AgentKit-Timestamp": timestamp,
            "X-AgentKit-Signature": sign(secret.encode(), timestamp, raw),
        }
        response = await self.post("/v1/opscore/internal/agent/notify", content=raw, headers=headers)
        return response.status_code

    async def bring_up(self, agent: SimAgent) -> None:
        """initializing (before the webhook, as the real AgentKit), webhook, idle; retried until Ops-Core answers."""
        delay = 0.2
        while True:
            try:
                async with agent.lock:
                    await self.report(agent, "initializing")
                    status = await self.webhook("REGISTER", agent)
                    if status >= 300:
                        raise RuntimeError(f"webhook answered {status}")
                    await self.report(agent, "idle")
                return
            except (httpx.HTTPError, RuntimeError) as exc:
                log.warning("bring-up failed, retrying", extra={"agentId": agent.agent_id, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat)
            for agent in list(self.agents.values()):
                if agent.simulated and not agent.lock.locked() and agent.state in ("idle", "active"):
                    async with agent.lock:
                        await self.report(agent, agent.state)

    def outcome(self, agent: SimAgent) -> str:
        if agent.script:
            return agent.script.pop(0)
        return "error" if self.random.random() < self.config.failure_rate else "ok"

    async def play(self, agent: SimAgent, body: dict[str, Any], outcome: str) -> None:
        """What a simulated agent does with one task."""
        if outcome == "silent":
            return
        payload = body.get("payload") or {}
        task_id = body.get("opscore_task_id") or payload.get("opscore_task_id")
        echo = {"opscore_task_id": task_id} if self.config.echo_task_id and task_id else {}
        async with agent.lock:
            await asyncio.sleep(self.config.latency / 2)
            await self.report(agent, "active", dict(echo))
            await asyncio.sleep(self.config.latency / 2)
            agent.working = False  # before the report: Ops-Core may hand it the next task at once
            if outcome == "error":
                await self.report(agent, "error", {**echo, "error": "simulated failure"})
                await self.report(agent, "idle")
                return
            result = {
                "task": body.get("task_name"),
                "by": agent.agent_id,
                "attempt": payload.get("attempt"),
                "parameters": payload.get("task_parameters"),
            }
            await self.report(agent, "idle", {**echo, "result": result})


def create_app(config: SimConfig) -> FastAPI:
    sim = Simulator(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sim.client = httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=200))
        for i in range(config.agents):
            agent = SimAgent(f"{config.prefix}-{i}", f"Simulated agent {i}", list(config.capabilities), True)
            sim.agents[agent.agent_id] = agent
            sim.spawn(sim.bring_up(agent))
        sim.spawn(sim.heartbeats())
        try:
            yield
        finally:
            for task in list(sim.background):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*sim.background, return_exceptions=True)
            await sim.client.aclose()

    app = FastAPI(title="AgentKit stand-in (Ops-Core simulator)", lifespan=lifespan)
    app.state.sim = sim

    @app.get("/health")
    async def health() -> dict[str, Any]:
        ready = sum(1 for a in sim.agents.values() if a.simulated and a.state != "registered")
        return {"status": "ok", "agents": len(sim.agents), "ready": ready}

    @app.post("/v1/agents/register", status_code=201)
    async def register(request: Request) -> JSONResponse:
        """AgentKit's registration: remember the agent and send Ops-Core the signed webhook."""
        body = await request.json()
        agent_id = body.get("agentId") or str(uuid.uuid4())
        agent = SimAgent(
            agent_id,
            body.get("agentName") or agent_id,
            list(body.get("capabilities") or []),
            bool(body.get("simulate", False)),
        )
        sim.agents[agent_id] = agent
        if agent.simulated:
            sim.spawn(sim.bring_up(agent))
        else:
            sim.spawn(sim.webhook("REGISTER", agent, body.get("metadata")))
        return JSONResponse(
            {"status": "success", "message": "Agent registered successfully", "data": {"agentId": agent_id}},
            status_code=201,
        )

    @app.post("/v1/agents/{agent_id}/run")
    async def run(agent_id: str, request: Request) -> JSONResponse:
        """202 and the agent gets to work; 404 for an unknown agent; ``runStatus`` overrides."""
        body = await request.json()
        agent = sim.agents.get(agent_id)
        status = sim.run_status or (202 if agent is not None else 404)
        outcome = sim.outcome(agent) if agent is not None and status == 202 else None
        overlap = agent is not None and agent.working
        sim.calls.append(
            {
                "agentId": agent_id,
                "body": body,
                "status": status,
                "outcome": outcome,
                "overlap": overlap,
                "receivedAt": time.time(),
            }
        )
        if status != 202:
            return JSONResponse({"status": "error", "detail": f"answered {status}"}, status_code=status)
        assert agent is not None and outcome is not None
        agent.runs += 1
        agent.working = agent.simulated and outcome != "silent"
        if agent.simulated:
            sim.spawn(sim.play(agent, body, outcome))
        return JSONResponse({"status": "success", "message": "Message accepted for processing"}, status_code=202)

    @app.get("/calls")
    async def calls(agentId: str | None = None) -> dict[str, Any]:  # noqa: N803
        return {"items": [c for c in sim.calls if agentId is None or c["agentId"] == agentId]}

    @app.delete("/calls")
    async def clear_calls() -> dict[str, Any]:
        sim.calls.clear()
        return {"status": "ok"}

    @app.get("/agents")
    async def agents() -> dict[str, Any]:
        return {
            "items": [
                {"agentId": a.agent_id, "state": a.state, "capabilities": a.capabilities, "runs": a.runs}
                for a in sim.agents.values()
            ]
        }

    @app.post("/control")
    async def control(request: Request) -> dict[str, Any]:
        body = await request.json()
        if "latency" in body:
            config.latency = float(body["latency"])
        if "failureRate" in body:
            config.failure_rate = float(body["failureRate"])
        if "echoTaskId" in body:
            config.echo_task_id = bool(body["echoTaskId"])
        if "runStatus" in body:
            sim.run_status = None if body["runStatus"] is None else int(body["runStatus"])
        for agent_id, script in (body.get("scripts") or {}).items():
            if agent_id in sim.agents:
                sim.agents[agent_id].script = [s for s in script if s in OUTCOMES]
        return {
            "latency": config.latency,
            "failureRate": config.failure_rate,
            "runStatus": sim.run_status,
            "echoTaskId": config.echo_task_id,
        }

    @app.post("/agents/{agent_id}/report")
    async def report(agent_id: str, request: Request) -> JSONResponse:
        """Make an agent report a state now (demos, tests)."""
        body = await request.json()
        agent = sim.agents.get(agent_id)
        if agent is None:
            return JSONResponse({"detail": "unknown agent"}, status_code=404)
        async with agent.lock:
            status = await sim.report(agent, body["state"], body.get("details"))
        return JSONResponse({"status": status})

    return app
