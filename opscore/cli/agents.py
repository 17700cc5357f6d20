"""``opscore agents``: list, show, report a state, fire a trigger, register (through the client)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from opscore import terminal as term

if TYPE_CHECKING:
    from opscore.wire import AgentView, StateReportAnswer
from opscore.cli.base import State, cli, json_object, json_option, pass_state

# -- agents -------------------------------------------------------------------------------------


@cli.group()
def agents() -> None:
    """Agents: list, show, report a state, fire a trigger, register (client)."""


def agent_fields(agent: AgentView) -> None:
    term.fields(
        [
            ("agent", agent.agentId),
            ("state", agent.state),
            ("revision", agent.revision),
            ("name", agent.agentName),
            ("version", agent.version),
            ("capabilities", ", ".join(agent.capabilities) or None),
            ("endpoint", agent.contactEndpoint),
            ("metadata", json.dumps(agent.metadata) if agent.metadata else None),
            ("last seen", agent.lastSeenAt),
            ("last report", agent.lastReportAt),
            ("registered", agent.registeredAt),
            ("updated", agent.updatedAt),
        ]
    )


def moved(answer: StateReportAnswer) -> None:
    """A transition's answer in one line."""
    colour = term.colour_enabled()
    if answer.changed:
        audit_id = "" if answer.auditId is None else f", audit record {answer.auditId}"
        click.echo(
            f"{answer.agentId}: {term.state(answer.previousState, colour)} -> {term.state(answer.state, colour)}"
            f"  (revision {answer.revision}{audit_id})"
        )
    else:
        click.echo(f"{answer.agentId}: {term.state(answer.state, colour)}  (unchanged: a heartbeat)")


@agents.command("list")
@click.option("--state", "state_name", metavar="STATE", help="only agents in this state")
@click.option("--capability", help="only agents with this capability")
@json_option
@pass_state
def agents_list(state: State, state_name: str | None, capability: str | None, as_json: bool) -> None:
    """Every agent (every page), ordered by id.

    --json prints {"items": [agent, ...]}, every page walked.
    """
    with state.client() as client:
        items = list(client.agents.list(state=state_name, capability=capability, limit=1000))
    if as_json:
        term.emit_json({"items": items})
        return
    columns = [
        term.Column("AGENT"),
        term.Column("STATE", coloured=True),
        term.Column("REV", right=True),
        term.Column("LAST SEEN"),
        term.Column("CAPABILITIES"),
    ]
    rows = [(a.agentId, a.state, a.revision, a.lastSeenAt, ", ".join(a.capabilities)) for a in items]
    term.table(columns, rows, empty="no agents")


@agents.command("show")
@click.argument("agent_id")
@click.option("--at", metavar="ISO", help="the state at this moment instead, replayed from the audit chain")
@json_option
@pass_state
def agents_show(state: State, agent_id: str, at: str | None, as_json: bool) -> None:
    """One agent: state, revision, metadata, last seen."""
    with state.client() as client:
        if at is not None:
            snapshot = client.agents.state(agent_id, at=at)
            if as_json:
                term.emit_json(snapshot)
                return
            term.fields(
                [
                    ("agent", snapshot.agentId),
                    ("at", snapshot.at),
                    ("state", snapshot.state),
                    ("since", snapshot.since),
                    ("previous state", snapshot.previousState),
                    ("revision", snapshot.revision),
                    ("seq", snapshot.seq),
                ]
            )
            return
        agent = client.agents.get(agent_id)
    if as_json:
        term.emit_json(agent)
    else:
        agent_fields(agent)


@agents.command("report")
@click.argument("agent_id")
@click.argument("state_name", metavar="STATE")
@click.option("--details", metavar="JSON", help="a JSON object sent as the report's details")
@click.option("--timestamp", metavar="ISO", help="when the agent was in this state (default: now)")
@click.option("--if-match", type=int, metavar="REVISION", help="apply only at this revision (else 412)")
@json_option
@pass_state
def agents_report(
    state: State,
    agent_id: str,
    state_name: str,
    details: str | None,
    timestamp: str | None,
    if_match: int | None,
    as_json: bool,
) -> None:
    """Report an agent's state, as AgentKit's SDK does.

    An agent never seen before is registered on the spot. Exit 1 with the states allowed now
    when the move is illegal.
    """
    body = json_object(details, "--details")
    with state.client() as client:
        answer = client.agents.report(agent_id, state_name, body, timestamp=timestamp, if_match=if_match)
    if as_json:
        term.emit_json(answer)
    else:
        moved(answer)


@agents.command("trigger")
@click.argument("agent_id")
@click.argument("trigger")
@click.option("--details", metavar="JSON", help="a JSON object recorded with the transition")
@click.option("--if-match", type=int, metavar="REVISION", help="apply only at this revision (else 412)")
@json_option
@pass_state
def agents_trigger(
    state: State, agent_id: str, trigger: str, details: str | None, if_match: int | None, as_json: bool
) -> None:
    """Fire a trigger by name (recover, restart, go_offline, deregister, ...)."""
    body = json_object(details, "--details")
    with state.client() as client:
        answer = client.agents.trigger(agent_id, trigger, body, if_match=if_match)
    if as_json:
        term.emit_json(answer)
    else:
        moved(answer)


@agents.command("register")
@click.argument("agent_id")
@click.option("--name", help="the agent's name")
@click.option("--agent-version", "version", metavar="VERSION", help="the agent's version")
@click.option("--capability", "capabilities", multiple=True, help="a capability (repeat for several)")
@click.option("--endpoint", help="the agent's contact endpoint (URL)")
@click.option("--metadata", metavar="JSON", help="a JSON object of metadata")
@json_option
@pass_state
def agents_register(
    state: State,
    agent_id: str,
    name: str | None,
    version: str | None,
    capabilities: tuple[str, ...],
    endpoint: str | None,
    metadata: str | None,
    as_json: bool,
) -> None:
    """Register an agent, or update a known agent's metadata (its state is kept)."""
    meta = json_object(metadata, "--metadata")
    with state.client() as client:
        agent = client.agents.register(
            agent_id, name=name, version=version, capabilities=capabilities, contact_endpoint=endpoint, metadata=meta
        )
    if as_json:
        term.emit_json(agent)
    else:
        agent_fields(agent)
