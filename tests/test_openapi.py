"""The OpenAPI document stays true: every route is in it and nothing else; it is what
/openapi.json serves; it is a valid OpenAPI 3.1 document. (The route tests check their
responses against it through `tests.openapi_check.hook`.)"""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema_rs
from starlette.routing import Route

from gateway.app import GatewaySettings, create_app
from gateway.openapi import DOCUMENT
from relay.client import RelayClient
from tests.conftest import free_port
from tests.openapi_check import check, operation


async def routes() -> set[tuple[str, str]]:
    async with RelayClient(f"127.0.0.1:{free_port()}") as relay:  # never called
        app = create_app(GatewaySettings(), relay)
    found = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                found.add((route.path, method.lower()))
    return found


async def test_every_route_is_described_and_nothing_else() -> None:
    described = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert described == await routes()


def test_every_operation_names_its_path_parameters_and_error_schema() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            in_path = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert in_path == {s[1:-1] for s in path.split("/") if s.startswith("{")}, path
            for status, response in op["responses"].items():
                if status >= "400" and path.startswith("/api/"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)


def test_the_document_is_valid_openapi_and_its_schemas_are_valid_json_schema() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    for name, schema in DOCUMENT["components"]["schemas"].items():
        jsonschema_rs.meta.validate(schema)  # raises on an invalid JSON Schema
        assert name[0].isupper()


async def test_openapi_json_serves_the_document() -> None:
    async with RelayClient(f"127.0.0.1:{free_port()}") as relay:  # never called
        transport = httpx.ASGITransport(app=create_app(GatewaySettings(), relay))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            response = await http.get("/openapi.json")
    assert response.status_code == 200 and response.json() == DOCUMENT
    check(response, response.content)


def test_the_checker_catches_what_the_document_does_not_say() -> None:
    def response(status: int, json: Any, method: str = "GET", path: str = "/healthz") -> Any:
        return httpx.Response(status, json=json, request=httpx.Request(method, "http://x" + path))

    ok = response(200, {"status": "ok", "relay": "serving"})
    check(ok, ok.content)
    for bad in (
        response(418, {"status": "ok", "relay": "serving"}),  # undocumented status
        response(200, {"status": "fine"}),  # body off its schema
        response(500, {"error": {"code": "x", "message": "y"}}, "GET", "/healthz"),  # not its 500
        response(400, {"error": "no"}, "POST", "/api/chat"),
    ):
        try:
            check(bad, bad.content)
        except AssertionError:
            continue
        raise AssertionError(f"{bad} passed the check")
    assert operation("GET", "/api/chat/some-chat/stream") is not None
    assert operation("DELETE", "/api/chat") is None
