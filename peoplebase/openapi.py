"""The OpenAPI 3.0 document of every route the server answers, served at GET /openapi.json.

tests/test_openapi.py checks it against the routes of app.py and fuzzes the running server
with it (schemathesis): every answer must be one the document declares.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from . import __version__

ERROR = {"$ref": "#/components/schemas/Error"}
AUTH_ERROR = {"$ref": "#/components/schemas/AuthError"}


def _json(schema: dict[str, Any], description: str, **headers: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return out


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    if retry:
        return _json(ERROR, description, **{"Retry-After": "Seconds to wait before retrying"})
    return _json(ERROR, description)


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


REDIRECT = {
    "description": "Redirect (to the sign-in page when there is no session)",
    "headers": {"Location": {"description": "Where to go", "schema": {"type": "string"}}},
}

INGEST_PARAMS = [
    {"$ref": f"#/components/parameters/{name}"}
    for name in ("data", "verbose", "strict", "callback", "img", "ip")
]

INGEST_RESPONSES: dict[str, Any] = {
    "200": {
        "description": (
            "`1` when at least one record was valid and committed, else `0`; JSON with "
            "verbose=1 or strict=1; JavaScript with callback=; a GIF with img=1"
        ),
        "content": {
            "text/plain": {"schema": {"type": "string", "enum": ["0", "1"]}},
            "application/json": {"schema": {"type": "object"}},
            "text/javascript": {"schema": {"type": "string"}},
            "image/gif": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "400": {
        "description": "Invalid request (too many records, bad callback, strict=1 failures)",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    "413": _error("Body over max_body_bytes (after decompression); nothing was read past it"),
    "429": _error("Over the project's rate_limit; nothing applied", retry=True),
    "503": _error("Write queue full or storage cannot commit; nothing applied", retry=True),
}

EVENTS_RESPONSES: dict[str, Any] = {
    "200": {
        "description": "`0` (events are not stored); JSON with verbose=1",
        "content": {
            "text/plain": {"schema": {"type": "string", "enum": ["0"]}},
            "application/json": {"schema": {"type": "object"}},
        },
    },
    "413": _error("Body over max_body_bytes"),
}

INGEST_BODY: dict[str, Any] = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"type": "object"},
                    {"type": "array", "items": {"type": "object"}, "maxItems": 2000},
                ]
            }
        },
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "properties": {
                    "data": {"type": "string", "description": "JSON or base64(JSON)"},
                    "verbose": {"type": "string"},
                    "strict": {"type": "string"},
                    "callback": {"type": "string"},
                    "img": {"type": "string"},
                    "ip": {"type": "string"},
                },
            }
        },
    },
}

PREFLIGHT = {
    "summary": "CORS preflight",
    "responses": {"200": {"description": "CORS headers for any origin"}},
}

QUERY_PARAMS = [
    {"$ref": f"#/components/parameters/{name}"}
    for name in (
        "distinct_id",
        "distinct_ids",
        "where",
        "output_properties",
        "page",
        "session_id",
        "project_id",
    )
]

QUERY_ERRORS: dict[str, Any] = {
    "400": _error("Invalid parameter or where expression, or query timeout"),
    "401": _json(AUTH_ERROR, "Missing or invalid credentials"),
    "403": _json(AUTH_ERROR, "The credentials do not open this project"),
    "413": _error("Body over max_body_bytes"),
    "429": _error(
        "Too many queries running for the project, or too many failed authentications "
        "from this address",
        retry=True,
    ),
    "503": _error("Storage cannot be read right now", retry=True),
}

QUERY_RESULT = {
    "type": "object",
    "required": ["page", "page_size", "session_id", "status", "total", "results"],
    "properties": {
        "page": {"type": "integer", "minimum": 0},
        "page_size": {"type": "integer"},
        "session_id": {"type": "string"},
        "status": {"type": "string", "enum": ["ok"]},
        "total": {"type": "integer", "minimum": 0},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["$distinct_id", "$properties"],
                "properties": {
                    "$distinct_id": {"type": "string"},
                    "$properties": {"type": "object"},
                },
            },
        },
    },
}


def _form(params: list[dict[str, Any]]) -> dict[str, Any]:
    """The same parameters as a form body (Mixpanel's clients POST them)."""
    names = [p["$ref"].rsplit("/", 1)[-1] for p in params]
    return {
        "required": False,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {name: {"type": "string"} for name in names},
                }
            }
        },
    }


def _query_op(summary: str, result: dict[str, Any], method: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"projectSecret": []}],
        "parameters": QUERY_PARAMS,
        "responses": {"200": result, **QUERY_ERRORS},
    }
    if method == "post":
        op["requestBody"] = _form(QUERY_PARAMS)
    return op


def _ingest_path(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "parameters": INGEST_PARAMS, "responses": responses},
        "post": {
            "summary": summary,
            "parameters": INGEST_PARAMS,
            "requestBody": INGEST_BODY,
            "responses": responses,
        },
        "options": PREFLIGHT,
    }


def _param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def build() -> dict[str, Any]:
    """The document, as a dict."""
    paths: dict[str, Any] = {}
    engage = _ingest_path("Profile updates ($set, $add, ... $delete): SPEC §1-§6", INGEST_RESPONSES)
    paths["/engage"] = engage
    paths["/engage/"] = engage
    for route in ("track", "import", "decide", "flags", "record", "groups"):
        paths[f"/{route}"] = _ingest_path(
            f"/{route}: answered 0, nothing stored (send events to Mixpanel)", EVENTS_RESPONSES
        )
    engage_result = _json(QUERY_RESULT, "One page of matching profiles")
    for path in ("/api/query/engage", "/api/2.0/engage"):
        paths[path] = {
            "get": _query_op("Engage query API (SPEC §9)", engage_result, "get"),
            "post": _query_op("Engage query API (SPEC §9)", engage_result, "post"),
        }
    export_params = [*QUERY_PARAMS, {"$ref": "#/components/parameters/format"}]
    export_result = {
        "description": "Every matching profile, one per line (NDJSON) or a CSV table",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
    export_op = {
        "summary": "Export every matching profile (streamed)",
        "security": [{"projectSecret": []}],
        "parameters": export_params,
        "responses": {"200": export_result, **QUERY_ERRORS},
    }
    paths["/api/query/export"] = {
        "get": export_op,
        "post": {**export_op, "requestBody": _form(export_params)},
    }
    paths["/healthz"] = {
        "get": {
            "summary": "Liveness and readiness",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["status", "version", "queued_records"],
                        "properties": {
                            "status": {"type": "string", "enum": ["ok"]},
                            "version": {"type": "string"},
                            "queued_records": {"type": "integer", "minimum": 0},
                        },
                    },
                    "Ready",
                ),
                "503": _error("Starting", retry=True),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document")},
        }
    }
    paths["/"] = {"get": {"summary": "Redirect to the web page", "responses": {"303": REDIRECT}}}
    ui_get: dict[str, Any] = {
        "summary": "Web page (signed-in session cookie)",
        "responses": {"200": _html("The page"), "303": REDIRECT, "404": _html("No such page")},
    }
    paths["/ui/"] = {"get": ui_get}
    paths["/ui/profiles"] = {
        "get": {
            **ui_get,
            "parameters": [_param("q", "Search"), _param("where", "Filter"), _param("after", "")],
            "responses": {**ui_get["responses"], "400": _html("Bad filter")},
        }
    }
    paths["/ui/profiles/{distinct_id}"] = {
        "get": {
            **ui_get,
            "parameters": [
                {
                    "name": "distinct_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                },
                _param("at", "Show the profile as it was at this time"),
            ],
        }
    }
    paths["/ui/login"] = {
        "get": {"summary": "Sign-in form", "responses": {"200": _html("The form")}},
        "post": {
            "summary": "Sign in with the project secret (or service account)",
            "requestBody": {
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "secret": {"type": "string"},
                                "project_id": {"type": "string"},
                                "csrf": {"type": "string"},
                            },
                        }
                    }
                }
            },
            "responses": {
                "303": REDIRECT,
                "400": _html("Unreadable form"),
                "401": _html("Wrong credentials"),
                "403": _html("Missing or wrong CSRF token"),
                "429": _html("Too many failed sign-ins from this address"),
            },
        },
    }
    paths["/ui/logout"] = {
        "post": {
            "summary": "Sign out",
            "responses": {
                "303": REDIRECT,
                "400": _html("Unreadable form"),
                "403": _html("Missing or wrong CSRF token"),
            },
        }
    }
    paths["/ui/static/{name}"] = {
        "get": {
            "summary": "The page's CSS and JavaScript",
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "The file",
                    "content": {
                        "text/css": {"schema": {"type": "string"}},
                        "text/javascript": {"schema": {"type": "string"}},
                        "application/octet-stream": {"schema": {"type": "string"}},
                    },
                },
                "404": {
                    "description": "No such file",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            },
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Peoplebase",
            "version": __version__,
            "description": (
                "A self-hosted, Mixpanel-compatible user-profile store. Ingestion routes take "
                "any path prefix (/api/2/engage works like /engage). Every response carries "
                "X-Content-Type-Options: nosniff; ingestion responses carry CORS headers."
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "projectSecret": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "User: the project secret, empty password; or a service "
                    "account's user and secret with project_id",
                }
            },
            "parameters": {
                "data": _param("data", "JSON or base64(JSON): one record or a list"),
                "verbose": _param("verbose", "1: answer {status, error}"),
                "strict": _param("strict", "1: per-record errors (400)"),
                "callback": _param(
                    "callback", "JSONP: a JavaScript identifier path; anything else is 400"
                ),
                "img": _param("img", "1: answer a 1x1 GIF"),
                "ip": _param("ip", "0: do not geolocate from the request address"),
                "distinct_id": _param("distinct_id", "One profile"),
                "distinct_ids": _param("distinct_ids", "A JSON list of profiles"),
                "where": _param("where", "A Mixpanel where expression"),
                "output_properties": _param("output_properties", "A JSON list of properties"),
                "page": _param("page", "Page number (from 0)"),
                "session_id": _param("session_id", "From page 0, for later pages"),
                "project_id": _param("project_id", "The project (service accounts)"),
                "format": _param(
                    "format",
                    "ndjson (default) or csv",
                    {"type": "string", "enum": ["ndjson", "csv"]},
                ),
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "error", "status"],
                    "properties": {
                        "code": {"type": "integer"},
                        "error": {"type": "string"},
                        "status": {"type": "string"},
                    },
                },
                "AuthError": {
                    "type": "object",
                    "required": ["error", "status"],
                    "properties": {
                        "error": {"type": "string"},
                        "status": {"type": "string", "enum": ["error"]},
                    },
                },
            },
        },
    }


@cache
def openapi_json() -> bytes:
    return orjson.dumps(build())
