"""The backend behind the HTTP routes, in Label Studio's familiar shape:
``setup``, ``predict(tasks, context)`` and ``fit(event, data)``.

One instance serves every project that connects; per project it keeps the label config,
the served model version (``ModelStore``) and the training state (``Trainer``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from model.regions import umap_is_warm, warm_up_umap

from .config import Settings
from .images import ImageFetcher
from .label_config import LabelSchema, parse_label_config
from .labelstudio import sdk_client
from .pool import PoolScorer
from .predictor import Predictor
from .store import MAX_PROJECT_ID_DIGITS, ModelStore, is_project_id
from .trainer import ProjectSource, Trainer
from .urls import UnsafeURL, parse_target, shorten

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}
TRAINING_EVENTS = {"START_TRAINING"}
# Sent by Label Studio to every connected backend, but nothing to do for this one.
IGNORED_EVENTS = {
    "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
    "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",
}


class BadRequest(ValueError):
    """Input the backend cannot use; becomes an HTTP 4xx (`status`) with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def project_id(value) -> str:
    """Label Studio names a project "<id>.<created-at>" in /setup and /predict, and {"id": ...} in webhooks.

    The one place ids are checked: ASCII digits, at most MAX_PROJECT_ID_DIGITS of them
    (``str.isdigit`` would also take "\u0661", which then breaks every path and /health).
    """
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.split(".", 1)[0]
    else:
        text = None
    if text is None or not is_project_id(text):
        raise BadRequest(
            f"Missing or malformed project id: {shorten(value)} (Label Studio's numeric project id, "
            f"at most {MAX_PROJECT_ID_DIGITS} digits)."
        )
    return str(int(text))


def _same_origin(url: str, target) -> bool:
    try:
        return parse_target(url).same_origin(target)
    except UnsafeURL:
        return False


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"SEGAL_DEVICE={name} but no CUDA device is available; use SEGAL_DEVICE=cpu.")
    return torch.device(name)


class ActiveLearningBackend:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._environment_url = settings.label_studio_url  # the only URL the environment's key may go to
        self.device = choose_device(settings.device)
        self.store = ModelStore(settings.model_dir, self.device)
        self.fetcher = ImageFetcher(settings)
        self.predictor = Predictor(settings, self.store, self.fetcher)
        self.schemas: dict[str, LabelSchema] = {}
        self.pool = PoolScorer(settings, self.store, self.predictor, self.schemas, self._client)
        self.trainer = Trainer(
            settings, self.store, self.fetcher, ProjectSource(self._client), self.schemas, listener=self.pool,
            gate=self.predictor.gate,
        )
        self.started_at = time.time()
        # load the newest checkpoint of every project in the background, so that a restart is
        # ready to serve without making the first request wait for it
        threading.Thread(target=self._preload, name="preload-models", daemon=True).start()
        self._counters = {"predict_requests": 0, "predicted_tasks": 0, "webhooks": 0, "bad_requests": 0}
        self._lock = threading.Lock()

    def _preload(self) -> None:
        for project in self.store.stored_projects():
            try:
                self.store.current(project)  # loads and warms up the region projector too
            except Exception:  # noqa: BLE001 - a bad project dir must not stop the others
                log.exception("project %s: could not load its models", project)
                continue
            if self.settings.label_studio_url and self.settings.label_studio_api_key:
                self.pool.connected(project)  # resume scoring the pool without waiting for a /setup
        if self.settings.contrastive_weight > 0:
            # numba compiles UMAP at a process's first fit (40-60 s on 2 cores, only partly
            # cached on disk): pay it now, so the fit after a training run takes seconds
            seconds = warm_up_umap()
            if seconds:
                log.info("region projector (UMAP) code compiled in %.1f s", seconds)

    # -- Label Studio API -----------------------------------------------------------------

    def _client(self, project: str):
        return sdk_client(self.settings.label_studio_url, self.settings.label_studio_api_key)

    def _adopt_credentials(self, hostname, access_token) -> None:
        """Use the URL and token Label Studio sends in /setup where the environment gives none.

        A key only ever goes to the URL it came with (README "Security"): the environment's
        LABEL_STUDIO_API_KEY to the environment's LABEL_STUDIO_URL, and a URL learned here only
        with the access_token of the same call, never with the environment's key. Once a URL
        is learned, /setup calls naming another host are ignored.
        """
        token = access_token.strip() if isinstance(access_token, str) else ""
        offered = None
        if isinstance(hostname, str) and hostname.strip():
            try:
                offered = parse_target(hostname.strip())
            except UnsafeURL as error:
                log.warning("ignoring the hostname of a /setup call: %s", error)
        if offered is None:
            return
        changes = {}
        if self._environment_url:
            # the environment names Label Studio: a token from /setup may only fill a missing key,
            # and only when it came from that same Label Studio
            same = _same_origin(self._environment_url, offered)
            if same and token and not self.settings.label_studio_api_key:
                changes["label_studio_api_key"] = token
        else:
            current = self.settings.label_studio_url
            if current and not _same_origin(current, offered):
                log.warning(
                    "ignoring /setup's hostname %s: the backend already uses %s (set LABEL_STUDIO_URL to choose)",
                    shorten(offered.origin), current,
                )
                return
            learned = offered.url.rstrip("/")
            if (learned, token) != (current, self.settings.label_studio_api_key):
                changes = {"label_studio_url": learned, "label_studio_api_key": token}
        if changes:
            log.info("using %s from Label Studio's /setup call", ", ".join(sorted(changes)))
            self.settings = dataclasses.replace(self.settings, **changes)
            self.fetcher.settings = self.settings
            self.predictor.settings = self.settings
            self.trainer.settings = self.settings
            self.pool.settings = self.settings

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    # -- the protocol ---------------------------------------------------------------------

    def setup(self, project, schema: str, hostname=None, access_token=None) -> dict:
        pid = project_id(project)
        try:
            self.schemas[pid] = parse_label_config(schema)
        except ValueError as error:
            raise BadRequest(str(error)) from error
        self._adopt_credentials(hostname, access_token)
        self.pool.connected(pid)  # the first time: webhook auth, then the pool is scored in the background
        return {"model_version": self.store.current_name(pid)}

    def schema_for(self, pid: str, label_config) -> LabelSchema:
        if isinstance(label_config, str) and label_config.strip():
            try:
                schema = parse_label_config(label_config)
            except ValueError as error:
                raise BadRequest(str(error)) from error
            self.schemas[pid] = schema
            return schema
        if pid in self.schemas:
            return self.schemas[pid]
        raise BadRequest("No label_config in the request and no /setup for this project yet.")

    def predict(self, tasks: list[dict], context: dict | None = None, *, project, label_config=None) -> list[dict]:
        pid = project_id(project)
        schema = self.schema_for(pid, label_config)
        results, errors = self.predictor.predict(pid, schema, tasks, context)
        self.count("predict_requests")
        self.count("predicted_tasks", len(tasks) - len(errors))
        if tasks and len(errors) == len(tasks):
            # nothing to show: say why instead of storing empty predictions (one bad task
            # among good ones only gets an empty result and a log line)
            raise BadRequest("No task could be predicted: " + "; ".join(errors[:5]), status=422)
        return results

    def fit(self, event: str, data: dict) -> dict:
        self.count("webhooks")
        if event in TRAINING_EVENTS:
            pid = project_id(data.get("project"))
            return {"status": "training", "project": pid, "training": self.trainer.request(pid, event)}
        if event in ANNOTATION_EVENTS:
            pid = project_id(data.get("project"))
            started = self.trainer.note_annotation_change(pid)
            return {"status": "training" if started else "noted", "project": pid}
        if event in IGNORED_EVENTS:
            return {"status": "ignored", "event": event}
        raise BadRequest(
            f"Unknown event {event!r}; this backend handles START_TRAINING and annotation events "
            f"({', '.join(sorted(ANNOTATION_EVENTS))})."
        )

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        training = self.trainer.states()
        pool = self.pool.states()
        served = self.store.projects()
        projects = {}
        for pid in sorted(set(training) | set(served) | set(self.schemas) | set(pool)):
            model = served.get(pid)
            projects[pid] = {
                "model_version": model.name if model else self.store.current_name(pid),
                "classes": list(self.schemas[pid].classes) if pid in self.schemas else None,
                # how region proposals are chosen: paper 004's clustering once a projector exists
                "region_selection": _region_selection(model),
                "memory_bank_vectors": len(model.memory_bank) if model and model.memory_bank is not None else 0,
                "training": training.get(pid),
                # the background job that scores every unlabeled task for Label Studio's task list
                "pool": pool.get(pid),
            }
        with self._lock:
            counters = dict(self._counters)
        return {
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "device": str(self.device),
            "acquisition": self.settings.acquisition,
            # False for the first minute after start-up: a training run that ends before it is
            # True pays the compilation in its projector fit
            "umap_compiled": umap_is_warm(),
            "projects": projects,
            **counters,
        }


def _region_selection(served) -> str:
    if served is None or served.model is None:
        return "random (cold start)"
    if served.projector is not None and served.model.projection is not None:
        return "umap-kmeans"
    return "entropy ranking"
