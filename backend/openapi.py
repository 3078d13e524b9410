"""The OpenAPI 3.0 document of the protocol the app speaks, served at ``GET /openapi.json``.

Written by hand from what Label Studio 1.23 sends (README "Protocol"); the property-based
test (tests/test_fuzz.py) generates requests from the same body schemas.
"""

from __future__ import annotations

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong and how to fix it"}},
}
_PROJECT = {
    "description": 'Label Studio\'s project, "<id>.<created-at>" (or the id): ASCII digits, at most 18',
    "oneOf": [{"type": "string", "pattern": r"^[0-9]{1,18}(\..*)?$"}, {"type": "integer", "minimum": 0}],
}
_REGION = {
    "type": "object",
    "description": "a Label Studio result: keypointlabels, brushlabels (RLE) or polygonlabels, coordinates in percent",
    "properties": {
        "from_name": {"type": "string"},
        "to_name": {"type": "string"},
        "type": {"type": "string", "enum": ["keypointlabels", "brushlabels", "polygonlabels"]},
        "original_width": {"type": "integer"},
        "original_height": {"type": "integer"},
        "value": {"type": "object"},
        "score": {"type": "number"},
    },
}
_TASK = {
    "type": "object",
    "properties": {
        "id": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 128}]},
        "data": {
            "type": "object",
            "description": "the <Image> value field holds the image URL: relative (Label Studio) or http(s)",
            "additionalProperties": True,
        },
        "annotations": {
            "type": "array",
            "nullable": True,
            "items": {
                "type": "object",
                "properties": {
                    "result": {"type": "array", "nullable": True, "items": _REGION},
                    "was_cancelled": {"type": "boolean"},
                },
            },
        },
    },
}


def _json_body(schema: dict, description: str) -> dict:
    return {"required": True, "description": description, "content": {"application/json": {"schema": schema}}}


def _answer(description: str, schema: dict | None = None) -> dict:
    answer = {"description": description}
    if schema is not None:
        answer["content"] = {"application/json": {"schema": schema}}
    return answer


_COMMON_ERRORS = {
    "400": _answer("malformed JSON, a missing or malformed field, an unsupported config", _ERROR),
    "401": _answer("basic auth required (BASIC_AUTH_USER / BASIC_AUTH_PASS)", _ERROR),
    "413": _answer("the body is larger than SEGAL_MAX_REQUEST_MB", _ERROR),
}
_STATUS = {"type": "object", "properties": {"projects": {"type": "object"}, "uptime_seconds": {"type": "number"}}}


def openapi_document() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "segal: Label Studio ML backend",
            "version": "1",
            "description": "Label Studio's ML-backend protocol: active learning for semantic segmentation.",
        },
        "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
        "security": [{}, {"basic": []}],  # basic auth only when BASIC_AUTH_USER / BASIC_AUTH_PASS are set
        "paths": {
            "/health": {
                "get": {
                    "summary": "liveness, model versions and training state per project",
                    "responses": {"200": _answer('{"status": "UP", ...}', _STATUS), "401": _COMMON_ERRORS["401"]},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "the same status, with request counters",
                    "responses": {"200": _answer("status and counters", _STATUS), "401": _COMMON_ERRORS["401"]},
                }
            },
            "/setup": {
                "post": {
                    "summary": "parse the project's labeling config; answers the served model version",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["project", "schema"],
                            "properties": {
                                "project": _PROJECT,
                                "schema": {"type": "string", "description": "the labeling config (XML)"},
                                "hostname": {"type": "string", "description": "Label Studio's URL"},
                                "access_token": {"type": "string", "description": "a token for that URL"},
                                "extra_params": {"nullable": True},
                            },
                        },
                        "what Label Studio sends when it connects and before each prediction batch",
                    ),
                    "responses": {
                        "200": _answer(
                            "the model version",
                            {"type": "object", "properties": {"model_version": {"type": "string"}}},
                        ),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/predict": {
                "post": {
                    "summary": "points and regions to label next, one result per task, in order",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["tasks", "project"],
                            "properties": {
                                "tasks": {"type": "array", "items": _TASK},
                                "project": _PROJECT,
                                "label_config": {"type": "string"},
                                "params": {
                                    "type": "object",
                                    "properties": {
                                        "context": {
                                            "type": "object",
                                            "nullable": True,
                                            "properties": {"result": {"type": "array", "items": _REGION}},
                                        }
                                    },
                                },
                            },
                        },
                        "tasks to predict (Retrieve Predictions, or an interactive call with the annotator's clicks)",
                    ),
                    "responses": {
                        "200": _answer(
                            "one item per task; a task whose image cannot be used gets an empty result",
                            {"type": "object", "properties": {"results": {"type": "array"}}},
                        ),
                        **_COMMON_ERRORS,
                        "422": _answer("no task could be predicted; the reasons", _ERROR),
                        "503": _answer("every prediction slot is busy (SEGAL_THREADS); retry after Retry-After", _ERROR),
                    },
                }
            },
            "/webhook": {
                "post": {
                    "summary": "Label Studio events: START_TRAINING, annotation events; others acknowledged",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["action"],
                            "properties": {
                                "action": {"type": "string"},
                                "project": {
                                    "oneOf": [
                                        {"type": "object", "properties": {"id": {"type": "integer"}}},
                                        _PROJECT,
                                    ]
                                },
                                "annotation": {"type": "object"},
                                "task": {"type": "object"},
                            },
                        },
                        "an event; answered at once, training runs in the background",
                    ),
                    "responses": {"200": _answer("what the event started", {"type": "object"}), **_COMMON_ERRORS},
                }
            },
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": _answer("OpenAPI 3.0")}}},
        },
    }
