"""A representative subset of the ordered state pairs, over HTTP against the real server.

From every state: one declared target (applied), the current state (a heartbeat) and one
undeclared target (409 illegal_transition, recorded). The full matrix runs in
``tests/unit/test_pairs.py`` through the Engine.
"""

from __future__ import annotations

from tests.api.helpers import report, trigger
from tests.pairs import DECLARED, STATES, path_to
from tests.servers import Server

V1 = "/v1/opscore"


def subset() -> list[tuple[str, str]]:
    pairs = []
    for source in STATES:
        legal = [t for t in STATES if (source, t) in DECLARED]
        illegal = [t for t in STATES if t != source and (source, t) not in DECLARED]
        pairs.append((source, source))
        pairs += [(source, t) for t in {*legal[:1], *legal[-1:]}]
        pairs += [(source, t) for t in illegal[:1]]
    pairs += [("error", "active"), ("deregistered", "idle")]
    return pairs


def test_state_pairs_over_http(server: Server) -> None:
    pairs = subset()
    assert len(pairs) >= 20
    failures = []
    with server.client() as client:
        for n, (source, target) in enumerate(pairs):
            agent = f"pair-{n}-{source}-to-{target}"
            assert client.post(f"{V1}/agents", json={"agentId": agent}).status_code == 201
            for name in path_to(source):
                assert trigger(client, agent, name).status_code == 200
            assert client.get(f"{V1}/agent/{agent}").json()["state"] == source
            answer = report(client, agent, target)
            body = answer.json()
            if source == target:
                ok = answer.status_code == 200 and body["changed"] is False and body["auditId"] is None
            elif (source, target) in DECLARED:
                ok = answer.status_code == 200 and body["changed"] is True and body["state"] == target
                ok = ok and body["previousState"] == source and isinstance(body["auditId"], int)
            else:
                ok = answer.status_code == 409 and body["code"] == "illegal_transition"
                ok = ok and (body["from"], body["to"]) == (source, target)
                ok = ok and body["allowed"] == [s for s in STATES if (source, s) in DECLARED]
                last = client.get(f"{V1}/agent/{agent}/audit", params={"order": "desc", "limit": 1}).json()
                ok = ok and last["items"][0]["reason"] == "illegal_transition"
            if not ok:
                failures.append(f"{source} -> {target}: {answer.status_code} {answer.text}")
        assert client.get(f"{V1}/audit/verify").json()["ok"] is True
    assert not failures, "\n".join(failures)
