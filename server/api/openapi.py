"""/openapi.json as the server really answers: every error in OpenAI's shape (400 where FastAPI would
document 422), the admin routes under a bearer security scheme, and a `default` error for the statuses
any route can give (401, 403, 404, 409, 413, 415, 429, 499, 503)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from hotlora.server.api.schemas import ChatCompletionRequest, CompletionRequest

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_METHODS = ("get", "post", "put", "delete", "patch")


_OTHER_BODIES = {  # 200 bodies that are not JSON
    "/v1/completions": {"text/event-stream": {"schema": {"type": "string"}}},  # stream: true
    "/v1/chat/completions": {"text/event-stream": {"schema": {"type": "string"}}},
    "/metrics": {"text/plain": {"schema": {"type": "string"}}},
    "/admin/adapters/{name}/export": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
}
_NOT_JSON = ("/metrics", "/admin/adapters/{name}/export")  # their 200 has no JSON body at all


def _operation(path: str, op: dict[str, Any]) -> None:
    responses = op.setdefault("responses", {})
    if path in _OTHER_BODIES and "200" in responses:
        content = responses["200"].setdefault("content", {})
        if path in _NOT_JSON:
            content.clear()
        content.update(_OTHER_BODIES[path])
    responses.pop("422", None)
    responses["400"] = {"description": "Invalid request"} | _REF
    responses["default"] = {"description": "Error"} | _REF
    if path.startswith("/admin"):
        op["security"] = [{"bearerAuth": []}]


def _exact_request_schemas() -> dict[str, Any]:
    """The request bodies as pydantic writes them: FastAPI's own copy turns integer bounds into floats
    (the seed's int64 maximum would read 9.223372036854776e+18, a value it cannot take)."""
    _, top = models_json_schema(
        [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    return top["$defs"]


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for path, item in schema.get("paths", {}).items():
                for method in _METHODS:
                    if method in item:
                        _operation(path, item[method])
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            schemas.update(_exact_request_schemas())
            schemas["Error"] = _ERROR
            components["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "the admin token"}
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
