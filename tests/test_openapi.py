"""The gateway's own /openapi.json, fuzzed by schemathesis against a running gateway (fake upstream) with a key:
no server errors, no status the document does not list, bodies in the declared shapes, and schema-valid requests
refused only for a reason that depends on the served model (documented in the schema's descriptions)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from shipyard.testing import FakeOpenAI
from tests.helpers import ServerThread, wait_for
from tests.stack import API_KEY
from tests.test_tasks import GOOD_DRAFT

MODEL_DEPENDENT = {"model_not_found", "max_tokens_too_large", "unknown_template"}
"""Codes of the refusals a schema-valid request may get: they depend on what is served and configured (model,
context length, reply templates), not on the shape; the schema's descriptions say so."""


@pytest.fixture(scope="module")
def gateway_schema() -> Iterator[schemathesis.BaseSchema]:
    fake = FakeOpenAI("fake-model", token_rate=100_000.0, default_tokens=2, max_model_len=1024)
    fake.json_answer = json.dumps(GOOD_DRAFT)  # /v1/reply's schema-constrained draft, as a real engine writes it
    data_dir = Path(tempfile.mkdtemp(prefix="shipyard-openapi-"))
    config = load_settings(api_keys=API_KEY, admin_keys="sk-admin-openapi", health_interval_s=0.2, data_dir=data_dir)
    with ServerThread(fake) as upstream:
        app = create_app(config, [Replica(upstream.url, name="fake-0", deployment="blue", version="v1")])
        with ServerThread(app) as gateway:
            assert wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200)
            yield schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
    """Hypothesis-driven cases of one operation (schemathesis's pytest plugin does not load under pytest 9)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        case.validate_response(response, checks=CHECKS)
        if mode is GenerationMode.POSITIVE and 400 <= response.status_code < 500:
            code = (response.json().get("error") or {}).get("code")
            assert code in MODEL_DEPENDENT, (
                f"{case.operation.label}: schema-valid request refused ({response.status_code} {code}): {case.body!r}"
            )

    try:
        check()
    except Unsatisfiable:  # an operation without parameters or body has no invalid form
        assert mode is GenerationMode.NEGATIVE


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_document_tells_the_truth(gateway_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in gateway_schema.exclude(path_regex="^/admin/").get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        fuzz(operation, mode)


def test_every_forwarded_route_declares_its_body_and_errors(gateway_schema: schemathesis.BaseSchema) -> None:
    raw = gateway_schema.raw_schema
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/tokenize",
                 "/detokenize", "/v1/intent", "/v1/reply"):  # fmt: skip
        operation = raw["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith(
            "#/components/schemas/"
        )
        assert {"400", "401", "404", "413", "422", "429", "502", "503"} <= set(operation["responses"]), path
    assert "additionalProperties" in raw["components"]["schemas"]["ChatCompletionRequest"]  # pass-through fields
    assert "404" in raw["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["description"]
