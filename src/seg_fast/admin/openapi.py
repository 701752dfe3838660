"""The admin API as an OpenAPI 3.1 document, built from the route table and the
msgspec types (so it cannot drift from what the server accepts)."""
from __future__ import annotations

import msgspec

from seg_fast.policy.engine import REASONS
from seg_fast.policy.gate import LOG_AREAS, LOG_LEVELS
from seg_fast.policy.model import PolicyDocument

_REF = "#/components/schemas/{name}"


def _content_type(pattern: str) -> str:
    if "/download/" in pattern:
        return "text/csv"
    if pattern == "/metrics":
        return "text/plain"
    if pattern.startswith("/seg/admin"):
        return "text/html" if pattern == "/seg/admin" else "text/javascript"
    if pattern.endswith("/log"):
        return "application/x-ndjson"
    return "application/json"


def document(routes) -> dict:
    from seg_fast.admin.api import DxStart, OverrideBody, TestModeBody
    from seg_fast.admin.console import BulkBody
    from seg_fast.policy.source import PushMessage

    (doc_schema, push_schema, ov_schema, tm_schema, bulk_schema, dx_schema), components = \
        msgspec.json.schema_components([PolicyDocument, PushMessage, OverrideBody, TestModeBody, BulkBody, DxStart],
                                       ref_template=_REF)
    components["LogLevels"] = {
        "type": "object",
        "propertyNames": {"enum": list(LOG_AREAS)},
        "additionalProperties": {"enum": list(LOG_LEVELS)},
    }
    components["Error"] = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    components["Reason"] = {"enum": list(REASONS)}
    bodies = {"PolicyDocument": doc_schema, "Push": push_schema, "Override": ov_schema, "TestMode": tm_schema,
              "Bulk": bulk_schema, "DxStart": dx_schema,
              "LogLevels": {"$ref": _REF.format(name="LogLevels")}}
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "responses": {
                "200": {"description": "OK", "content": {
                    _content_type(r.pattern): {"schema": {}}}},
                "400": {"description": "Malformed request", "content": {"application/json": {
                    "schema": {"$ref": _REF.format(name="Error")}}}},
                "401": {"description": "Missing or wrong token"},
                "404": {"description": "Not found"},
            },
        }
        params = [seg[1:-1] for seg in r.pattern.split("/") if seg.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                for p in params]
        if r.body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": bodies[r.body]}}}
        if r.auth == "push":
            op["security"] = [{"pushToken": []}]
        elif r.auth == "none":
            op["security"] = []
        elif r.auth == "metrics":
            op["security"] = [{"adminToken": []}, {}]     # or from loopback without a token
        paths.setdefault(r.pattern, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "seg-fast admin API", "version": "1",
                 "description": "Diagnostics, policy lookups, CSV downloads, logging levels and dashboard "
                                "actions of one seg-fast gateway, on 127.0.0.1:44444."},
        "servers": [{"url": "http://127.0.0.1:44444"}],
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "[admin] token, or the generated one in the token file"},
                "pushToken": {"type": "http", "scheme": "bearer", "description": "[policy] push_token"},
            },
        },
    }
