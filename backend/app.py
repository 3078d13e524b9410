"""The HTTP side of Label Studio's ML-backend protocol (Flask).

    GET  /health    {"status": "UP", ...} plus training progress per project
    POST /setup     {"project", "schema", "hostname", "access_token"} -> {"model_version"}
    POST /predict   {"tasks", "project", "label_config", "params": {"context"}} -> {"results": [...]}
    POST /webhook   {"action": EVENT, "project": {...}, ...} -> answers at once, trains in the background
    GET  /metrics   counters, model versions, training state

Bad input gets a 4xx with a message; an unexpected error a 500 whose details stay in the
server log. Optional HTTP basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) guards every route.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from .config import Settings
from .service import ActiveLearningBackend, BadRequest

log = logging.getLogger(__name__)


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def create_app(settings: Settings | None = None, backend: ActiveLearningBackend | None = None) -> Flask:
    settings = settings or Settings.from_env()
    backend = backend or ActiveLearningBackend(settings)
    app = Flask(__name__)
    app.config["BACKEND"] = backend

    @app.before_request
    def check_basic_auth():
        expected = settings.basic_auth
        if expected is None:
            return None
        given = request.authorization
        ok = (
            given is not None
            and given.type == "basic"
            and hmac.compare_digest(given.username or "", expected[0])
            and hmac.compare_digest(given.password or "", expected[1])
        )
        if not ok:
            response = jsonify(error="Authentication required (HTTP basic auth, see BASIC_AUTH_USER).")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="segal"'
            return response
        return None

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest):
        backend.count("bad_requests")
        log.warning("%d %s %s: %s", error.status, request.method, request.path, error)
        return jsonify(error=str(error)), error.status

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

    @app.post("/setup")
    def setup():
        body = _json_body()
        if "schema" not in body:
            raise BadRequest('Missing "schema" (the project\'s labeling config).')
        return jsonify(
            backend.setup(body.get("project"), body["schema"], body.get("hostname"), body.get("access_token"))
        )

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
            raise BadRequest('"tasks" must be a list of task objects.')
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context") if isinstance(params.get("context"), dict) else None
        results = backend.predict(tasks, context, project=body.get("project"), label_config=body.get("label_config"))
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        event = body.get("action")
        if not isinstance(event, str) or not event:
            raise BadRequest('Missing "action" (the webhook event name).')
        return jsonify(backend.fit(event, body)), 200

    return app
