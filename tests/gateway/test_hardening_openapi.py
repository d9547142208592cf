"""The gateway's OpenAPI document (``/openapi.json``) and schemathesis against it: generated
requests, valid and invalid, never get a server error (issue 14)."""

from __future__ import annotations

import pytest

from areal_agents.gateway import Gateway
from areal_agents.gateway.openapi import OPERATIONS, openapi_document
from areal_agents.gateway.server import ServerThread
from areal_agents.testing.engine import ScriptedEngine

ADMIN = "schema-admin"


def served_operations(gw: Gateway) -> set[tuple[str, str]]:
    return {(m, r.path) for r in gw.app.routes for m in r.methods if m != "HEAD"}


async def test_openapi_json_lists_every_route_with_schemas(served):
    async with served.http(None) as http:  # no key needed
        r = await http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == served_operations(served.gw) == set(OPERATIONS)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "model", "messages"]
    assert set(chat["responses"]) >= {"200", "400", "401", "404", "413"}
    assert chat["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []


def test_a_route_without_an_openapi_entry_is_an_error():
    from starlette.routing import Route

    async def nothing(request):  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(KeyError, match="'/v1/new'"):
        openapi_document([Route("/v1/new", nothing, methods=["GET"])])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(tok, mode):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    gw = Gateway(admin_key=ADMIN)
    gw.add_policy("tiny", [ScriptedEngine(["hello", "<tool_call>{\"name\": \"f\"}</tool_call>"],
                                          tokenizer=tok, max_context=512)], tok, max_n=2)
    schema = schemathesis.openapi.from_dict(openapi_document(gw.app.routes))
    failures: list[str] = []

    def call(case, url: str) -> None:
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"},
                             timeout=30)
        name = f"{case.operation.method.upper()} {case.operation.path}"
        if response.status_code >= 500:
            failures.append(f"{name} -> {response.status_code}: {response.text[:300]} "
                            f"(body {case.body!r:.200})")
        elif response.status_code >= 400 and response.status_code != 413:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, name

    checked = []
    with ServerThread(gw.app) as server:
        for result in schema.get_all_operations():
            operation = result.ok()
            strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
            try:
                settings(max_examples=15, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))(
                    given(case=strategy)(lambda case: call(case, server.url)))()
            except Unsatisfiable:  # nothing to make invalid (no body, no typed parameter)
                assert mode == "negative", operation.path
                continue
            checked.append((operation.method.upper(), operation.path))
    assert failures == []
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
            ("POST", "/rl/sessions"), ("POST", "/admin/update_weights")} <= set(checked)
