"""The HTTP side of Label Studio's ML-backend protocol (Flask).

    GET  /health    {"status": "UP", ...} plus training progress per project
    POST /setup     {"project", "schema", "hostname", "access_token"} -> {"model_version"}
    POST /predict   {"tasks", "project", "label_config", "params": {"context"}} -> {"results": [...]}
    POST /webhook   {"action": EVENT, "project": {...}, ...} -> answers at once, trains in the background
    GET  /metrics   counters, model versions, training state

    GET  /openapi.json  the OpenAPI document of the above

Bad input gets a 4xx with a message; an unexpected error a 500 whose details stay in the
server log. Optional HTTP basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) guards every route.
Bodies are bounded (SEGAL_MAX_REQUEST_MB, SEGAL_MAX_JSON_DEPTH), and at most SEGAL_THREADS - 2
predictions run at once, so that /health, /setup and webhooks always find a free thread.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .config import Settings
from .openapi import openapi_document
from .payloads import PayloadError, check_predict_body, parse_json_object
from .service import ActiveLearningBackend, BadRequest
from .urls import shorten

log = logging.getLogger(__name__)
FREE_THREADS = 2  # request threads that predictions never take: /health, /setup, webhooks
RETRY_AFTER_SECONDS = 5


def _json_body(max_depth: int) -> dict:
    # a JSON content type, as Label Studio sends: a cross-site form cannot send one without
    # the browser asking first, so a web page cannot post events to a backend on the LAN
    if not request.is_json:
        raise BadRequest("The request body must be a JSON object (Content-Type: application/json).")
    try:
        return parse_json_object(request.get_data(cache=True), max_depth)
    except PayloadError as error:
        raise BadRequest(str(error)) from None


def _basic_credentials() -> tuple[bytes, bytes] | None:
    """(user, password) as the bytes the client sent; werkzeug's parser gives up on non-UTF-8."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, separator, password = raw.partition(b":")
    return (user, password) if separator else None


def _same_secret(given: bytes, expected: str) -> bool:
    """Constant-time comparison of bytes. Clients encode non-ASCII credentials as UTF-8 (curl,
    browsers) or Latin-1 (python-requests, hence Label Studio): either form matches."""
    forms = [expected.encode("utf-8")]
    try:
        forms.append(expected.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return any([hmac.compare_digest(given, form) for form in forms])  # a list: no short-circuit


def create_app(settings: Settings | None = None, backend: ActiveLearningBackend | None = None) -> Flask:
    settings = settings or Settings.from_env()
    backend = backend or ActiveLearningBackend(settings)
    app = Flask(__name__)
    app.config["BACKEND"] = backend
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    predict_slots = threading.BoundedSemaphore(max(1, settings.threads - FREE_THREADS))

    @app.before_request
    def check_basic_auth():
        expected = settings.basic_auth
        if expected is None:
            return None
        given = _basic_credentials()
        ok = given is not None and all([_same_secret(given[0], expected[0]), _same_secret(given[1], expected[1])])
        if not ok:
            response = jsonify(error="Authentication required (HTTP basic auth, see BASIC_AUTH_USER).")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="segal"'
            return response
        return None

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest):
        backend.count("bad_requests")
        log.warning("%d %s %s: %s", error.status, request.method, request.path[:200], str(error)[:1000])
        return jsonify(error=str(error)), error.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):
        backend.count("bad_requests")
        limit = settings.max_request_bytes / 2**20
        log.warning("413 %s %s: body over %g MiB", request.method, request.path[:200], limit)
        return jsonify(error=f"The request body is larger than {limit:g} MiB (SEGAL_MAX_REQUEST_MB)."), 413

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(error=error.description), error.code

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("500 %s %s", request.method, request.path)
        return jsonify(error=f"Internal error ({type(error).__name__}); see the backend log."), 500

    @app.get("/")
    @app.get("/health")
    def health():
        status = backend.status()
        return jsonify(status="UP", model_class="segal", **status)

    @app.get("/metrics")
    def metrics():
        return jsonify(backend.status())

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document())

    @app.post("/setup")
    def setup():
        body = _json_body(settings.max_json_depth)
        if "schema" not in body:
            raise BadRequest('Missing "schema" (the project\'s labeling config).')
        if not isinstance(body["schema"], str):
            raise BadRequest(f'"schema" must be the labeling config as a string of XML, got {type(body["schema"]).__name__}.')
        return jsonify(
            backend.setup(body.get("project"), body["schema"], body.get("hostname"), body.get("access_token"))
        )

    @app.post("/predict")
    def predict():
        body = _json_body(settings.max_json_depth)
        try:
            tasks, context = check_predict_body(body)
        except PayloadError as error:
            raise BadRequest(str(error)) from None
        if not predict_slots.acquire(blocking=False):
            log.warning("503 POST /predict: all %d prediction slots busy", max(1, settings.threads - FREE_THREADS))
            response = jsonify(
                error="Every prediction slot is busy (SEGAL_THREADS - 2 predictions run at once); retry shortly."
            )
            response.status_code = 503
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        try:
            results = backend.predict(tasks, context, project=body.get("project"), label_config=body.get("label_config"))
        finally:
            predict_slots.release()
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        body = _json_body(settings.max_json_depth)
        event = body.get("action")
        if not isinstance(event, str) or not event:
            raise BadRequest('Missing "action" (the webhook event name).')
        if len(event) > 100:
            raise BadRequest(f"Unknown event {shorten(event, 60)}: event names are short upper-case words.")
        return jsonify(backend.fit(event, body)), 200

    return app
