"""Schemathesis against the app's own OpenAPI document, in process (issue 9 item 12).

Every operation of ``/openapi.json`` is fuzzed with a valid bearer key, on a temporary SQLite
file under the app's lifespan: Schemathesis's examples, coverage (boundary values, missing
and wrong-typed parameters, bodies that are not UTF-8, ...) and fuzzing phases, valid and
invalid data alike. A case fails on any 5xx, any status the operation does not declare, any
body that does not match the declared schema, a wrong content type, a declared header
missing, invalid data accepted or a request without its key served (see ``CHECKS``). The
last test checks the totals: every operation, at least 1,000 cases, and prints the figures
(``pytest -s`` shows them).

Generation is deterministic (a fixed seed): a failure here is reproducible, not a flake. NaN,
lone surrogates and deep nesting are not Schemathesis's to find (it never generates them):
the adversarial module covers those.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi import checks

from opscore.api import create_app
from opscore.config import Settings

# Schemathesis's own strategies call `random` (a Hypothesis deprecation, not a finding about Ops-Core)
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

KEY = "fuzz-key"
MAX_EXAMPLES = 30
"""Per operation and generation mode in the fuzzing phase; the coverage phase adds its own."""
MIN_CASES = 1000

CHECKS = [
    schemathesis.checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.missing_required_header,
    checks.unsupported_method,
    checks.ignored_auth,
    checks.use_after_free,
    checks.ensure_resource_availability,
]
"""Schemathesis's checks but two, which ask what no schema of this API can promise:
``positive_data_acceptance`` (a request that fits the schema must succeed: an opaque cursor
is any string to a schema, If-Match "0" is a well-formed header that answers 412, a
definition's graph rules and "exactly one of" are not JSON Schema) and
``allow_header_conformance`` (Starlette's 405 names the methods of the first route that
matched the path, so ``OPTIONS /v1/opscore/agents`` says ``Allow: POST`` without GET)."""


@dataclass
class Figures:
    """What the fuzzing did: cases per operation, answers per status."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    operations: set[str] = field(default_factory=set)

    def summary(self) -> str:
        per_op = ", ".join(f"{op}: {n}" for op, n in sorted(self.cases.items()))
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"{sum(self.cases.values())} cases over {len(self.cases)} of {len(self.operations)} operations\n"
            f"statuses: {statuses}\nper operation: {per_op}"
        )


FIGURES = Figures()


DATABASE = Path(tempfile.gettempdir()) / f"opscore-fuzz-{os.getpid()}-{secrets.token_hex(4)}" / "fuzz.db"
"""Made by the fixture below, removed after the run: collecting this module creates nothing."""

APP = create_app(
    Settings(
        database_url=f"sqlite:///{DATABASE}",
        api_key=KEY,
        webhook_secret="fuzz-webhook-secret",
        agentkit_api_url="http://127.0.0.1:9",  # the discard port: a dispatched task reaches nothing
        stream_max_seconds=0.05,  # the audit stream ends (event: end, max_age) and its answer can be checked
    )
)

# The document as the app serves it; the schema's cases are sent to the app in process. Not
# ``schemathesis.pytest.from_fixture``: its lazy mode breaks on pytest 9 (``Function._nodeid``),
# and ``from_asgi`` would start the app's lifespan while pytest merely collects this module.
schema = schemathesis.openapi.from_dict(
    APP.openapi(),
    config=SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {KEY}"},
            "seed": 20261130,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "suppress-health-check": ["all"],
        }
    ),
)
schema.app = APP
FIGURES.operations = {op.ok().label for op in schema.get_all_operations()}


@pytest.fixture(scope="module", autouse=True)
def database() -> Iterator[Path]:
    """A fresh SQLite file; Schemathesis starts the app's lifespan on the first case, ended here."""
    DATABASE.parent.mkdir()
    try:
        yield DATABASE
    finally:
        schemathesis_asgi.shutdown_lifespans()
        shutil.rmtree(DATABASE.parent)


@schema.parametrize()
def test_every_operation_survives_fuzzing(case: Any) -> None:
    response = case.call()
    FIGURES.cases[case.operation.label] += 1
    FIGURES.statuses[response.status_code] += 1
    case.validate_response(response, checks=CHECKS, headers={"Authorization": f"Bearer {KEY}"})


def test_fuzzing_reached_every_operation_with_enough_cases(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the fuzzing above (pytest keeps a module's order); alone it has nothing to count."""
    with capsys.disabled():  # the figures belong in every run's output, not only with -s
        print(f"\nSchemathesis: {FIGURES.summary()}")
    assert FIGURES.operations, "run the whole module: the fuzzing test has not run"
    assert set(FIGURES.cases) == FIGURES.operations, FIGURES.summary()
    assert sum(FIGURES.cases.values()) >= MIN_CASES, FIGURES.summary()
    assert not [s for s in FIGURES.statuses if s >= 500], FIGURES.summary()
