"""Shape checks on request bodies, before any of it reaches the backend.

Label Studio's payloads are trusted in shape only once checked here: a field that the code
iterates (``annotations``, a ``result``) must be a list, nesting is bounded (a deep
structure would hit Python's recursion limit in parsing, ``repr`` or logging), and what a
message echoes is cut short (``backend.urls.shorten``).
"""

from __future__ import annotations

import json

from .urls import shorten

MAX_TASK_ID_CHARACTERS = 128


class PayloadError(ValueError):
    """The body cannot be used; the message says which field and why (a 400)."""


def parse_json_object(data: bytes, max_depth: int) -> dict:
    """The body as a JSON object, nested at most `max_depth` deep."""
    try:
        body = json.loads(data)
    except RecursionError:
        raise PayloadError(f"The JSON body is nested too deeply (the limit is {max_depth}, SEGAL_MAX_JSON_DEPTH).") from None
    except ValueError as error:
        raise PayloadError(f"The request body must be a JSON object; it is not valid JSON ({str(error)[:200]}).") from None
    if not isinstance(body, dict):
        raise PayloadError("The request body must be a JSON object.")
    if nesting_exceeds(body, max_depth):
        raise PayloadError(f"The JSON body is nested deeper than {max_depth} levels (SEGAL_MAX_JSON_DEPTH).")
    return body


def nesting_exceeds(value, limit: int) -> bool:
    """Whether `value` (parsed JSON) nests dicts and lists deeper than `limit`; iterative."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _list_or_none(value, what: str) -> None:
    if value is not None and not isinstance(value, list):
        raise PayloadError(f"{what} must be a list (or null), got {type(value).__name__}.")


def check_predict_body(body: dict) -> tuple[list[dict], dict | None]:
    """The tasks and the interactive context of a /predict body; raises PayloadError."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise PayloadError('"tasks" must be a list of task objects.')
    for index, task in enumerate(tasks):
        where = f"tasks[{index}]"
        task_id = task.get("id")
        if not (task_id is None or isinstance(task_id, int) or isinstance(task_id, str)):
            raise PayloadError(f"{where}.id must be a number or a string, got {type(task_id).__name__}.")
        if isinstance(task_id, str) and len(task_id) > MAX_TASK_ID_CHARACTERS:
            raise PayloadError(f"{where}.id is longer than {MAX_TASK_ID_CHARACTERS} characters.")
        if "data" in task and not isinstance(task["data"], dict):
            raise PayloadError(f"{where}.data must be an object, got {type(task['data']).__name__}.")
        annotations = task.get("annotations")
        _list_or_none(annotations, f"{where}.annotations")
        for number, annotation in enumerate(annotations or []):
            if isinstance(annotation, dict):
                _list_or_none(annotation.get("result"), f"{where}.annotations[{number}].result")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context") if isinstance(params.get("context"), dict) else None
    if context is not None:
        _list_or_none(context.get("result"), "params.context.result")
    return tasks, context
