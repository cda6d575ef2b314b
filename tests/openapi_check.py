"""Checks an HTTP response of the gateway against its OpenAPI document (`gateway/openapi.py`):
the status is one the operation documents, the content type one it lists, the headers it lists
are present, and a JSON body validates against the schema. Used as an httpx response hook."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema_rs

from gateway.openapi import DOCUMENT

_OPERATIONS = [
    (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path, item)
    for path, item in DOCUMENT["paths"].items()
]


def operation(method: str, path: str) -> dict[str, Any] | None:
    for pattern, _, item in _OPERATIONS:
        if pattern.match(path):
            found = item.get(method.lower())
            return found if isinstance(found, dict) else None
    return None


def check(response: httpx.Response, body: bytes | None) -> None:
    """`body`: the response's bytes, or None for a stream that is still being read."""
    request = response.request
    op = operation(request.method, request.url.path)
    if op is None:  # an unknown route or method: Starlette's 404/405, in the error shape
        if body is not None and response.status_code in (404, 405):
            _validate(DOCUMENT["components"]["schemas"]["Error"], body, response)
        return
    where = f"{request.method} {request.url.path} -> {response.status_code}"
    described = op["responses"].get(str(response.status_code))
    assert described is not None, f"{where}: status not in the OpenAPI document"
    for header in described.get("headers", {}):
        assert header in response.headers, f"{where}: header {header} missing"
    content = described.get("content")
    if not content:
        assert not body, f"{where}: a body where the document says none"
        return
    media = response.headers.get("content-type", "").split(";")[0].strip()
    assert media in content, f"{where}: content type {media!r}, documented {list(content)}"
    if media == "application/json" and body is not None:
        _validate(content[media]["schema"], body, response)


def _validate(schema: dict[str, Any], body: bytes, response: httpx.Response) -> None:
    validator = jsonschema_rs.validator_for({**schema, "components": DOCUMENT["components"]})
    errors = [str(e) for e in validator.iter_errors(httpx.Response(200, content=body).json())]
    assert not errors, f"{response.request.url.path}: {errors[:3]}"


async def hook(response: httpx.Response) -> None:
    """An httpx response hook: reads and checks every response but an event stream's."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        check(response, None)
    else:
        check(response, await response.aread())
