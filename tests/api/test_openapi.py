"""The OpenAPI document and the pages that show it (DESIGN §5, issue 10 item 1).

Read from the app in process: every ``$ref`` resolves, the bearer scheme is declared where
the server asks for a key, every answer has a typed schema and every error the one shape,
each request example is a request that succeeds, empty values the schema forbids are
refused, and the two pages load nothing from another host. The browser itself is in
``tests/browser/test_docs.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from opscore.api import create_app, openapi
from opscore.api.schemas import DEFINITION_EXAMPLE, WebhookEvent, WorkflowDefinition
from opscore.config import Settings
from opscore.errors import InvalidDefinition
from opscore.workflows.definitions import validate

KEY = "openapi-test-key"
SECRET = "openapi-test-secret"
V1 = "/v1/opscore"
ROOT = Path(__file__).resolve().parents[2]
METHODS = ("get", "put", "post", "delete", "patch")


def settings(database_url: str = "memory://") -> Settings:
    # AgentKit on the discard port: nothing in these tests may reach a real one
    return Settings(
        database_url=database_url, api_key=KEY, webhook_secret=SECRET, agentkit_api_url="http://127.0.0.1:9"
    )


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    """``/openapi.json`` as served (no store needed to serve it)."""

    async def fetch() -> dict[str, Any]:
        app = create_app(settings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            answer = await client.get("/openapi.json")
        assert answer.status_code == 200
        return dict(answer.json())

    return asyncio.run(fetch())


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


# -- $ref ----------------------------------------------------------------------------------------


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """The node a local JSON pointer names; ``KeyError`` saying where it breaks."""
    if not ref.startswith("#/"):
        raise KeyError(f"{ref}: not a reference inside this document")
    node: Any = doc
    for raw in ref[2:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or token not in node:
            raise KeyError(f"{ref}: nothing at {token!r}")
        node = node[token]
    return node


def unresolved(doc: dict[str, Any]) -> list[str]:
    """Every ``$ref`` anywhere in ``doc`` that names nothing, with where it sits."""
    broken: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                try:
                    resolve(doc, ref)
                except KeyError as exc:
                    broken.append(f"{where}: {exc}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(doc, "#")
    return broken


def test_the_walker_finds_a_nested_defs_reference() -> None:
    """What ReDoc choked on: a model schema put inline keeps ``#/$defs/...`` references."""
    inline = {"paths": {"/x": {"post": {"requestBody": {"schema": WebhookEvent.model_json_schema()}}}}}
    assert any("#/$defs/AgentDetails" in problem for problem in unresolved(inline))


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc))
    assert len(refs) > 50
    assert unresolved(doc) == []
    assert "$defs" not in json.dumps(doc)


# -- security, answers, errors -------------------------------------------------------------------


def test_bearer_scheme_on_every_v1_operation_but_the_webhook(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    for method, path, op in operations(doc):
        label = f"{method.upper()} {path}"
        if path.startswith(V1) and path != f"{V1}/internal/agent/notify":
            assert op.get("security") == [{"bearer": []}], label
            assert "401" in op["responses"], label
        else:
            assert "security" not in op, label


def test_every_success_answer_has_a_typed_schema(doc: dict[str, Any]) -> None:
    count = 0
    for method, path, op in operations(doc):
        successes = {s: r for s, r in op["responses"].items() if s.startswith("2")}
        assert successes, f"{method.upper()} {path} declares no success"
        for status, response in successes.items():
            content = response.get("content")
            assert content, f"{method.upper()} {path} {status} has no content"
            for media, body in content.items():
                schema = body.get("schema")
                assert schema not in (None, {}), f"{method.upper()} {path} {status} {media}: empty schema"
                target = resolve(doc, schema["$ref"]) if "$ref" in schema else schema
                assert target.get("properties") or target.get("anyOf") or target.get("type") == "string", (
                    f"{method.upper()} {path} {status}: {schema} says nothing about the answer"
                )
                count += 1
    assert count >= 28


def test_the_definition_body_is_typed_for_json_and_yaml(doc: dict[str, Any]) -> None:
    body = doc["paths"][f"{V1}/workflow-definitions"]["post"]["requestBody"]
    assert body["required"] is True
    for media in ("application/json", "application/yaml"):
        assert body["content"][media]["schema"] == {"$ref": "#/components/schemas/WorkflowDefinition"}
    model = doc["components"]["schemas"]["WorkflowDefinition"]
    task = resolve(doc, model["properties"]["tasks"]["items"]["$ref"])
    for field in (
        "taskId",
        "name",
        "agentCapability",
        "agentId",
        "parameters",
        "nextTaskId",
        "fallbackTaskId",
        "maxRetries",
        "timeoutSeconds",
        "retryBackoffSeconds",
    ):
        assert field in task["properties"], field
    inline = doc["components"]["schemas"]["StartRequest"]["properties"]["workflowDefinition"]
    assert {"$ref": "#/components/schemas/WorkflowDefinition"} in inline["anyOf"]


def test_every_error_answer_is_the_one_shape(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        for status, response in op["responses"].items():
            if status.startswith("2"):
                continue
            schema = response["content"]["application/json"]["schema"]
            target = resolve(doc, schema["$ref"])
            assert {"detail", "code"} <= set(target["required"]), f"{method.upper()} {path} {status}"
            assert target["properties"]["detail"]["type"] == "string", f"{method.upper()} {path} {status}"
    assert "HTTPValidationError" not in doc["components"]["schemas"]


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        pytest.param("post", f"{V1}/agent/{{agent_id}}/state", {"401", "409", "412", "413", "422", "503"}, id="report"),
        pytest.param("post", f"{V1}/agent/{{agent_id}}/transitions", {"401", "404", "409", "412", "422"}, id="trigger"),
        pytest.param("get", f"{V1}/machines/{{name}}/diagram", {"401", "404", "422", "501"}, id="diagram"),
        pytest.param("post", f"{V1}/internal/agent/notify", {"401", "404", "409", "413", "422", "503"}, id="webhook"),
        pytest.param("get", "/health", {"503"}, id="health"),
    ],
)
def test_error_statuses_are_declared(doc: dict[str, Any], method: str, path: str, statuses: set[str]) -> None:
    assert statuses <= set(doc["paths"][path][method]["responses"])


# -- examples are requests that work ----------------------------------------------------------

EXAMPLE_ORDER = [
    ("post", f"{V1}/agents", 201),
    ("post", f"{V1}/agent/{{agent_id}}/state", 200),
    ("post", f"{V1}/state-reports", 200),
    ("post", f"{V1}/agent/{{agent_id}}/transitions", 200),
    ("post", f"{V1}/internal/agent/notify", 200),
    ("post", f"{V1}/workflow-definitions", 201),
    ("post", f"{V1}/agent/{{agent_id}}/workflow", 202),
    ("post", f"{V1}/workflows/{{session_id}}/transitions", 200),
]
"""Every operation with a body, in an order where each example finds what it needs."""


def example_of(op: dict[str, Any]) -> Any:
    return op["requestBody"]["content"]["application/json"]["example"]


def webhook_headers(body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    signature = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-AgentKit-Timestamp": stamp, "X-AgentKit-Signature": signature, "Content-Type": "application/json"}


@asynccontextmanager
async def client_for(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings(database_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client


def fill(doc: dict[str, Any], method: str, path: str, known: dict[str, str]) -> str:
    """``path`` with its parameters: the document's examples, or what earlier answers named."""
    op = doc["paths"][path][method]
    values = {p["name"]: p.get("example") for p in op.get("parameters", []) if p["in"] == "path"}
    values.update({k: v for k, v in known.items() if k in values})
    assert all(values.values()), f"{method.upper()} {path}: no example for {values}"
    return path.format(**values)


async def send_example(
    client: httpx.AsyncClient, doc: dict[str, Any], method: str, path: str, known: dict[str, str], **headers: str
) -> httpx.Response:
    raw = json.dumps(example_of(doc["paths"][path][method])).encode()
    sent = {"Content-Type": "application/json", **headers}
    if path.endswith("/internal/agent/notify"):
        sent.update(webhook_headers(raw))
    answer = await client.request(method, fill(doc, method, path, known), content=raw, headers=sent)
    if "sessionId" in answer.text and answer.status_code == 202:
        known["session_id"] = answer.json()["sessionId"]
    return answer


def test_every_body_has_an_example_and_the_order_names_them_all(doc: dict[str, Any]) -> None:
    with_body = {(m, p) for m, p, op in operations(doc) if "requestBody" in op}
    assert with_body == {(m, p) for m, p, _ in EXAMPLE_ORDER}
    for method, path, _ in EXAMPLE_ORDER:
        assert isinstance(example_of(doc["paths"][path][method]), dict), f"{method.upper()} {path}"


def test_every_request_example_succeeds(doc: dict[str, Any], database_url: str) -> None:
    """Swagger's "Try it out" sends these as they are: none may answer 422 (or anything but success)."""

    async def scenario() -> list[tuple[str, int, int, str]]:
        results = []
        known: dict[str, str] = {}
        async with client_for(database_url) as client:
            for method, path, expected in EXAMPLE_ORDER:
                answer = await send_example(client, doc, method, path, known)
                results.append((f"{method.upper()} {path}", expected, answer.status_code, answer.text[:300]))
                if path.endswith("/state-reports"):
                    assert [r["status"] for r in answer.json()["results"]] == [200, 200], answer.text
            # the definition example is also valid YAML: the same body again answers 200
            as_yaml = yaml.safe_dump(DEFINITION_EXAMPLE, sort_keys=False).encode()
            again = await client.post(
                f"{V1}/workflow-definitions", content=as_yaml, headers={"Content-Type": "application/yaml"}
            )
            results.append(("POST definition as YAML", 200, again.status_code, again.text[:300]))
        return results

    for label, expected, status, text in asyncio.run(scenario()):
        assert status == expected, f"{label}: {status} {text}"


def parameters_that_refuse_empty(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for method, path, op in operations(doc):
        for param in op.get("parameters", []):
            schema = param.get("schema", {})
            branches = schema.get("anyOf", [schema])
            if param["in"] in ("query", "header") and any(b.get("minLength") == 1 for b in branches):
                found.append((method, path, param))
    return found


def test_empty_values_are_refused_where_the_schema_says_so(doc: dict[str, Any], database_url: str) -> None:
    """``at``, ``cursor``, ``If-Match`` (and ``Idempotency-Key``): the schema's minLength 1 is the server's rule."""
    found = parameters_that_refuse_empty(doc)
    names = {p["name"].lower() for _, _, p in found}
    assert {"at", "cursor", "if-match", "idempotency-key"} <= names

    async def scenario() -> list[tuple[str, int, str]]:
        results = []
        known: dict[str, str] = {}
        async with client_for(database_url) as client:
            for method, path, expected in EXAMPLE_ORDER:
                answer = await send_example(client, doc, method, path, known)
                assert answer.status_code == expected, answer.text
            for method, path, param in found:
                name = param["name"]
                label = f"{method.upper()} {path} {param['in']} {name}=''"
                if method == "get":
                    url = fill(doc, method, path, known)
                    params = {name: ""} if param["in"] == "query" else None
                    headers = {name: ""} if param["in"] == "header" else {}
                    answer = await client.get(url, params=params, headers=headers)
                else:
                    assert param["in"] == "header", label
                    answer = await send_example(client, doc, method, path, known, **{name: ""})
                results.append((label, answer.status_code, answer.text[:200]))
        return results

    results = asyncio.run(scenario())
    assert len(results) >= 12
    for label, status, text in results:
        assert status == 422, f"{label}: {status} {text}"
        assert json.loads(text)["code"], label


def test_a_body_that_is_not_utf8_is_a_422_in_the_error_shape(doc: dict[str, Any], database_url: str) -> None:
    """FastAPI answers 400 "There was an error parsing the body" for these, a status no operation declares."""

    async def scenario() -> list[tuple[str, int, dict[str, Any]]]:
        results = []
        known = {"session_id": "no-such-run"}
        async with client_for(database_url) as client:
            for method, path, _ in EXAMPLE_ORDER:
                raw = b'{"state": "\xff\xfe"}'
                headers = {"Content-Type": "application/json"}
                if path.endswith("/internal/agent/notify"):
                    headers = webhook_headers(raw)
                answer = await client.request(method, fill(doc, method, path, known), content=raw, headers=headers)
                results.append((f"{method.upper()} {path}", answer.status_code, answer.json()))
        return results

    for label, status, body in asyncio.run(scenario()):
        assert status == 422, f"{label}: {status} {body}"
        assert isinstance(body["detail"], str) and body["code"] in ("validation_error", "invalid_definition"), label


# -- the pages and their assets ----------------------------------------------------------------


def test_the_pages_name_only_assets_of_this_server() -> None:
    async def fetch() -> dict[str, httpx.Response]:
        app = create_app(settings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            answers = {p: await client.get(p) for p in ("/docs", "/redoc")}
            for page in list(answers.values()):
                for url in re.findall(r'(?:src|href)="([^"]+)"', page.text):
                    answers[url] = await client.get(url)
            return answers

    answers = asyncio.run(fetch())
    for page in ("/docs", "/redoc"):
        html = answers[page].text
        assert answers[page].status_code == 200
        assert "//" not in re.sub(r"<!--.*?-->", "", html, flags=re.DOTALL), f"{page} names another host"
        assert "fonts.googleapis" not in html
        policy = answers[page].headers["content-security-policy"]
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "http" not in policy
    assets = [u for u in answers if u.startswith(openapi.ASSETS_URL)]
    assert len(assets) >= 4
    for url in assets:
        assert answers[url].status_code == 200, url
    assert '"validatorUrl": null' in answers["/docs"].text


def test_the_vendored_assets_are_the_packages_files_with_their_licenses() -> None:
    base = openapi.ASSETS_DIR
    listed = {}
    for line in (base / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    for name, digest in listed.items():
        assert hashlib.sha256((base / name).read_bytes()).hexdigest() == digest, f"{name} differs from SHA256SUMS"
    on_disk = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()} - {"SHA256SUMS", "README.md"}
    assert on_disk == set(listed)
    assert {"swagger-ui/LICENSE", "swagger-ui/NOTICE", "redoc/LICENSE"} <= set(listed)
    readme = (base / "README.md").read_text()
    assert f"| {openapi.SWAGGER_UI_VERSION} |" in readme and f"| {openapi.REDOC_VERSION} |" in readme
    assert f'Version: "{openapi.REDOC_VERSION}"' in (base / "redoc/redoc.standalone.js.LICENSE.txt").read_text()
    assert f'PACKAGE_VERSION:"{openapi.SWAGGER_UI_VERSION}"' in (base / "swagger-ui/swagger-ui-bundle.js").read_text()


@pytest.mark.slow
def test_a_wheel_carries_the_assets(tmp_path: Path) -> None:
    """A non-editable install serves /docs from site-packages: the wheel must hold every asset.

    Built from a copy of the tree: setuptools leaves a ``build/`` directory beside the sources.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "opscore", source / "opscore", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("opscore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for line in (openapi.ASSETS_DIR / "SHA256SUMS").read_text().splitlines():
        assert f"opscore/static/docs/{line.split()[1]}" in names
    # the operator console's templates and assets too
    for path in [*(ROOT / "opscore/console/templates").glob("*.html"), *(ROOT / "opscore/static/console").iterdir()]:
        assert str(path.relative_to(ROOT)) in names, path


# -- the definition model says what definitions.py accepts ----------------------------------------


def _with_task(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(DEFINITION_EXAMPLE))
    body["tasks"][0].update(changes)
    return body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(DEFINITION_EXAMPLE, id="the-example"),
        pytest.param(_with_task(maxRetries=100), id="maxRetries-100"),
        pytest.param(_with_task(maxRetries=101), id="maxRetries-101"),
        pytest.param(_with_task(maxRetries=-1), id="maxRetries-negative"),
        pytest.param(_with_task(timeoutSeconds=0), id="timeout-0"),
        pytest.param(_with_task(timeoutSeconds=7 * 86400), id="timeout-a-week"),
        pytest.param(_with_task(timeoutSeconds=7 * 86400 + 1), id="timeout-over-a-week"),
        pytest.param(_with_task(retryBackoffSeconds=0), id="backoff-0"),
        pytest.param(_with_task(retryBackoffSeconds=86401), id="backoff-over-a-day"),
        pytest.param(_with_task(taskId="a:b"), id="taskId-colon"),
        pytest.param(_with_task(taskId="   "), id="taskId-blank"),
        pytest.param(_with_task(agentCapability=""), id="capability-empty"),
        pytest.param(_with_task(agentId="agent-7", agentCapability=None), id="pinned-agent"),
        pytest.param(_with_task(parameters=None, fallbackTaskId=None), id="nulls"),
        pytest.param({**DEFINITION_EXAMPLE, "id": "a/b"}, id="id-slash"),
        pytest.param({**DEFINITION_EXAMPLE, "id": " "}, id="id-blank"),
        pytest.param({**DEFINITION_EXAMPLE, "id": "x" * 201}, id="id-too-long"),
        pytest.param({**DEFINITION_EXAMPLE, "version": 2}, id="version-a-number"),
        pytest.param({**DEFINITION_EXAMPLE, "version": 1.5, "id": 7}, id="id-a-number"),
        pytest.param({**DEFINITION_EXAMPLE, "version": True}, id="version-a-bool"),
        pytest.param({**DEFINITION_EXAMPLE, "version": ""}, id="version-empty"),
        pytest.param({**DEFINITION_EXAMPLE, "tasks": []}, id="no-tasks"),
        pytest.param({**DEFINITION_EXAMPLE, "extra": {"kept": True}}, id="extra-field"),
    ],
)
def test_the_definition_model_agrees_with_the_validator(body: dict[str, Any]) -> None:
    """Field by field (the graph rules are the validator's alone): what one refuses, the other does."""
    try:
        validate(body, default_timeout=300)
        valid = True
    except InvalidDefinition:
        valid = False
    try:
        WorkflowDefinition.model_validate(body)
        typed = True
    except ValueError:
        typed = False
    assert typed == valid
