"""Pool scoring: keep Label Studio's task list ordered most-informative-first, with no click.

After every training run (and once when a project connects, with the cold-start proposals)
a background job scores every task of the project that has no submitted annotation with
the served version, and pushes the predictions to Label Studio in batches:

- the same proposals and score ``/predict`` would give (``Predictor.predict_task``), with
  ``model_version`` = the served version;
- after each batch, this backend's older predictions of those tasks (``segal-v*`` of another
  version, or a duplicate of this one) are deleted, so a task shows one current proposal;
  predictions of other models are never touched;
- after the first batch the project's ``model_version`` is set to the served version, so
  the Data Manager's "Prediction score" column and ordering use it. Tasks not scored yet
  have no score under it, and Label Studio sorts those last in either direction.

The job never blocks a request: it runs in its own thread, images are downloaded and decoded
by a small prefetch pool while the model works, pushes travel in an uploader thread while the
next batch is computed, memory is bounded whatever the pool size (one listing page, a few
prefetched images, two push batches). Forwards are not batched across tasks: on a CPU, MC
moments of 4 images at once cost 2.1x more per image than one at a time (measured here). A newer version or a training
run cancels it; training's end starts a new one. After a restart of the backend it resumes
at start-up for every project with a saved model (when the environment names Label Studio's
URL and key) or at the project's first ``/setup``: tasks that already hold a prediction of the
served version are skipped. A task that cannot be scored (unreadable image...) is skipped with a
reason, in the log and in ``/health``, and the job goes on.

With more than one process for the project (SEGAL_TRAIN_PROCS, one per GPU by default), a
job of a trained version is sharded: ``_ShardedJob`` starts ``backend.score_job`` under
torchrun, each rank scores the tasks whose id is its rank modulo N, and their progress records
are summed into the same PoolState.

MONAI Label does the same (re-score the dataset after every training); here the pool is Label
Studio's task list and the score its "Prediction score".
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.calibration import ScoreScale
from model.data import IGNORE_INDEX

from .config import Settings
from .jobs import wait_for_job
from .images import ImageFetchError
from .label_config import LabelSchema, parse_label_config
from .labelstudio import LabelStudioProject
from .predictor import Predictor, TaskError
from .store import ModelStore, ServedModel

log = logging.getLogger(__name__)

PUSH_BATCH = 25  # predictions per import request
PREFETCH = 4  # images downloaded and decoded ahead of the model
PREFETCH_THREADS = 2
CALIBRATION_TASKS = 32  # pool tasks a new version's score scale is fitted on
MIN_CALIBRATION_TASKS = 8  # fewer usable pool tasks: the training images fill in
RECENT_SKIPS = 20  # skip reasons kept for /health
RETRY_AFTER_SECONDS = 60  # a failed connect or job is retried on a /setup after this long
WEBHOOK_RETRY_SECONDS = 5  # until the webhook is found, /setup tries again after this long


@dataclass
class PoolState:
    status: str = "idle"  # idle | running | done | cancelled | failed | off
    phase: str = ""  # while running: listing | scoring pool
    reason: str = ""  # what started the current / last job
    version: str = ""  # the version it scores with
    total: int = 0  # tasks without a submitted annotation when the job began (capped by SEGAL_SCORE_POOL)
    done: int = 0  # scored and pushed
    already_current: int = 0  # held a prediction of this version already (a resumed job)
    skipped: int = 0  # could not be scored
    skipped_reasons: list[str] = field(default_factory=list)  # the most recent ones
    superseded: int = 0  # older predictions of this backend deleted
    tasks_per_second: float | None = None
    eta_seconds: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    jobs: int = 0
    webhooks_authorized: int = 0  # Label Studio webhooks of this backend that carry its basic auth
    # where the job's time went: the model, waiting for images, waiting for Label Studio's API
    compute_seconds: float = 0.0
    image_wait_seconds: float = 0.0
    api_wait_seconds: float = 0.0
    # paused while /predict requests computed (requests first, ``backend.gate``)
    request_wait_seconds: float = 0.0
    # a job in several processes: each rank's peak resident memory (MiB), in rank order
    rank_peak_rss_mib: list[float] = field(default_factory=list)

    def snapshot(self) -> dict:
        data = asdict(self)
        data["skipped_reasons"] = list(self.skipped_reasons)
        data["rank_peak_rss_mib"] = list(self.rank_peak_rss_mib)
        return data


@dataclass
class _Project:
    state: PoolState = field(default_factory=PoolState)
    thread: threading.Thread | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    restart: bool = False
    connected_at: float | None = None  # the first /setup handled (first job)
    webhook_authorized: bool = False  # Label Studio's webhook for this backend carries its basic auth
    webhook_tried_at: float | None = None
    training: bool = False  # a training run is going: it starts the next job when it ends


class Cancelled(Exception):
    pass


class PoolScorer:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        predictor: Predictor,
        schemas: dict[str, LabelSchema],
        client_factory: Callable[[str], object],
    ):
        self.settings = settings
        self.store = store
        self.predictor = predictor
        self.schemas = schemas
        self.client_factory = client_factory
        self._projects: dict[str, _Project] = {}
        self._lock = threading.Lock()

    def _project(self, project: str) -> _Project:
        return self._projects.setdefault(project, _Project())

    def _api(self, project: str) -> LabelStudioProject:
        return LabelStudioProject(self.client_factory, project)

    # -- triggers -------------------------------------------------------------------------

    def connected(self, project: str) -> None:
        """A /setup of `project`. The first one starts (or resumes) scoring the pool, as does one
        long after a failed job; with basic auth on, every /setup until Label Studio's webhook
        for this backend carries the credentials tries to give them to it (Label Studio may
        call /setup before it has created the webhook). Returns at once."""
        with self._lock:
            entry = self._project(project)
            now = time.time()
            failed = entry.state.status in ("failed", "off") and entry.state.finished_at is not None
            start_job = entry.connected_at is None or (
                failed and now - entry.state.finished_at > RETRY_AFTER_SECONDS
            )
            authorize = (
                self.settings.basic_auth is not None
                and not entry.webhook_authorized
                and now - (entry.webhook_tried_at or 0.0) > WEBHOOK_RETRY_SECONDS
            )
            if not (start_job or authorize):
                return
            if start_job:
                entry.connected_at = now
            if authorize:
                entry.webhook_tried_at = now
        threading.Thread(
            target=self._connect, args=(project, authorize, start_job), name=f"connect-{project}", daemon=True
        ).start()

    def _connect(self, project: str, authorize: bool, start_job: bool) -> None:
        if authorize:
            try:
                authorized, changed = self._api(project).authorize_webhooks(*self.settings.basic_auth)
                with self._lock:
                    entry = self._project(project)
                    entry.webhook_authorized = authorized > 0
                    entry.state.webhooks_authorized = authorized
                if changed:
                    log.info("project %s: gave %d Label Studio webhook(s) the backend's basic auth", project, changed)
            except Exception as error:  # noqa: BLE001 - webhooks are best effort; scoring goes on
                log.warning(
                    "project %s: could not give Label Studio's webhook the basic-auth header (%s); annotation "
                    "events will be refused until it has it", project, _describe(error),
                )
        if start_job:
            self.start(project, "project connected")

    def training_started(self, project: str) -> None:
        with self._lock:
            entry = self._project(project)
            entry.training = True
        self.cancel(project, "a training run started")

    def training_finished(self, project: str, version: int | None) -> None:
        with self._lock:
            self._project(project).training = False
        reason = f"new version segal-v{version}" if version else "training failed; resuming with the served version"
        self.start(project, reason)

    def start(self, project: str, reason: str) -> None:
        """Start a job with the served version; a running one is cancelled and restarted."""
        with self._lock:
            entry = self._project(project)
            if entry.training:
                return  # the run's end starts it, with the new version
            if self.settings.score_pool == 0:
                entry.state.status, entry.state.reason = "off", "SEGAL_SCORE_POOL=off"
                return
            entry.state.reason = reason
            if entry.thread is not None and entry.thread.is_alive():
                entry.restart = True
                entry.cancel.set()
                return
            entry.cancel.clear()
            entry.state.status = "running"
            entry.thread = threading.Thread(target=self._loop, args=(project,), name=f"pool-{project}", daemon=True)
            entry.thread.start()

    def run(self, project: str, reason: str) -> dict:
        """One job in the calling thread (benchmarks, scripts), even with SEGAL_SCORE_POOL=off;
        returns its final state."""
        with self._lock:
            entry = self._project(project)
            if entry.thread is not None and entry.thread.is_alive():
                raise RuntimeError(f"project {project}: a pool job is running already")
            entry.cancel.clear()
            entry.state.status, entry.state.reason = "running", reason
        self._run_job(project, entry)
        return self.states()[project]

    def cancel(self, project: str, reason: str) -> None:
        with self._lock:
            entry = self._project(project)
            entry.restart = False
            if entry.thread is not None and entry.thread.is_alive():
                log.info("project %s: pool scoring cancelled (%s)", project, reason)
                entry.cancel.set()

    def states(self) -> dict[str, dict]:
        with self._lock:
            return {project: entry.state.snapshot() for project, entry in self._projects.items()}

    def wait(self, project: str, timeout: float | None = None) -> None:
        """Block until the project's job (and a restart it has queued) ends; for tests and benchmarks."""

        def current() -> threading.Thread | None:
            with self._lock:
                return self._project(project).thread

        wait_for_job(current, timeout)

    # -- the job --------------------------------------------------------------------------

    def _loop(self, project: str) -> None:
        while True:
            entry = self._projects[project]
            self._run_job(project, entry)
            with self._lock:
                if not entry.restart:
                    return
                entry.restart = False
                entry.cancel.clear()
                entry.state.status = "running"

    def _run_job(self, project: str, entry: _Project) -> None:
        try:
            self._job(project, entry)
        except Cancelled:
            self._finish(entry, "cancelled")
        except Exception as error:  # noqa: BLE001 - a failed job must never take the server down
            log.warning("project %s: pool scoring failed: %s", project, _describe(error))
            self._finish(entry, "failed", _describe(error))

    def _finish(self, entry: _Project, status: str, error: str | None = None) -> None:
        with self._lock:
            entry.state.status, entry.state.error, entry.state.phase = status, error, ""
            entry.state.eta_seconds = None
            entry.state.finished_at = time.time()

    def _job(self, project: str, entry: _Project) -> None:
        state = entry.state
        served = self.store.current(project)
        try:
            api = self._api(project)
            api.client  # noqa: B018 - fails here when no Label Studio API is configured
        except RuntimeError as error:  # no Label Studio API configured: nothing to push to
            with self._lock:
                state.status, state.error, state.finished_at = "off", str(error), time.time()
            return
        schema = self.schemas.get(project)
        if schema is None:  # a restarted backend resuming before Label Studio's first /setup
            schema = self.schemas[project] = parse_label_config(api.label_config())
        if served.model is not None and served.classes != schema.classes:
            served = ServedModel(None, served.version, served.classes, {})  # as /predict does
        with self._lock:
            state.version, state.phase, state.error = served.name, "listing", None
            state.total = state.done = state.already_current = state.skipped = state.superseded = 0
            state.compute_seconds = state.image_wait_seconds = state.api_wait_seconds = 0.0
            state.skipped_reasons, state.rank_peak_rss_mib = [], []
            state.tasks_per_second = state.eta_seconds = None
            state.started_at, state.finished_at = time.time(), None
            state.jobs += 1
        ranks = self.scoring_processes() if served.model is not None else 1  # a cold start has no forward
        log.info(
            "project %s: scoring the pool with %s (%s)%s", project, served.name, state.reason,
            f" in {ranks} processes" if ranks > 1 else "",
        )  # fmt: skip
        if ranks == 1:
            _Job(self, project, entry, api, served, schema).run()
        else:
            _ShardedJob(self, project, entry, served, ranks).run()
        self._finish(entry, "done")
        log.info(
            "project %s: pool scored with %s: %d pushed, %d already current, %d skipped, %d old predictions removed",
            project, served.name, state.done, state.already_current, state.skipped, state.superseded,
        )

    def scoring_processes(self) -> int:
        """Processes for a pool job: the training's (SEGAL_TRAIN_PROCS; by default one per visible
        GPU), except with SEGAL_TRAIN_COMMAND (a cluster's nodes may not reach Label Studio)."""
        if self.settings.train_command:
            return 1
        if self.settings.train_procs is not None:
            return self.settings.train_procs
        device = self.store.device
        return max(1, torch.cuda.device_count()) if device.type == "cuda" and device.index is None else 1

    # -- the score scale of a new version (called by the trainer before it publishes) -----

    def fit_score_scale(
        self,
        project: str,
        candidate: ServedModel,
        schema: LabelSchema,
        training_samples: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> ScoreScale | None:
        """Fit the version's ScoreScale on the task values of up to CALIBRATION_TASKS pool
        tasks (the training images fill in when the pool is small or out of reach)."""
        values: list[float] = []
        try:
            page = next(self._api(project).pool_pages(page_size=CALIBRATION_TASKS), None)
            for pool_task in page.tasks if page is not None else []:
                try:
                    work = self.predictor.load(schema, pool_task.task)
                    self.predictor.gate.wait_for_requests()  # requests first
                    values.append(self.predictor.task_value(candidate, schema, work, pool_task.task))
                except Exception as error:  # noqa: BLE001 - a task it cannot score is just left out
                    log.info(
                        "project %s task %s: not used for the score scale: %s", project, pool_task.task["id"], error
                    )
        except Exception as error:  # noqa: BLE001 - no pool sample: the training images stand in
            log.info("project %s: no pool sample for the score scale (%s)", project, _describe(error))
        if len(values) < MIN_CALIBRATION_TASKS:
            for index, (image, labels) in enumerate(training_samples[:CALIBRATION_TASKS]):
                self.predictor.gate.wait_for_requests()
                values.append(self.predictor.image_value(candidate.model, image, labels != IGNORE_INDEX, seed=index))
        try:
            return ScoreScale.fit(values)
        except ValueError as error:
            log.warning("project %s: no score scale (%s); task scores use a fixed map", project, error)
            return None


class _Job:
    """One pass over the pool: list, prefetch, score, push in batches, supersede, switch.

    With `shard` = (rank, ranks) it is one rank's share of a sharded job (``backend.score_job``):
    the tasks whose id is rank modulo ranks, and its share of the cap; `on_progress` is then
    called after every pushed batch and every skipped task (outside the scorer's lock)."""

    def __init__(self, scorer: PoolScorer, project: str, entry: _Project, api: LabelStudioProject,
                 served: ServedModel, schema: LabelSchema, shard: tuple[int, int] | None = None,
                 on_progress: Callable[[], None] | None = None):  # fmt: skip
        self.scorer, self.project, self.entry, self.api = scorer, project, entry, api
        self.served, self.schema = served, schema
        self.state = entry.state
        self.limit = scorer.settings.score_pool or None  # None: every task (0, off, stops only automatic jobs)
        self.shard = shard
        self.on_progress = on_progress
        if shard is not None and self.limit is not None:
            self.limit = -(-self.limit // shard[1])  # ceil: the ranks together score the cap
        self.batch: list[dict] = []
        self.to_delete: list[int] = []
        self.switched = False
        self.scoring_started: float | None = None
        self.uploader: ThreadPoolExecutor | None = None  # one thread: pushes and deletes, in order
        self.upload: Future | None = None  # the batch on its way
        self.pool_remaining = 0  # tasks without a submitted annotation, the whole pool's (first page)

    def _check_cancel(self) -> None:
        if self.entry.cancel.is_set():
            raise Cancelled()

    def _tasks(self):
        """The pool tasks, lazily, page by page; sets the job's total from the first page."""
        first = True
        for page in self.api.pool_pages():
            if first:
                self.pool_remaining = page.remaining
                total = page.remaining if self.limit is None else min(page.remaining, self.limit)
                with self.scorer._lock:
                    self.state.total, self.state.phase = total, "scoring pool"
                first = False
            yield from page.tasks

    def run(self) -> None:
        predictor = self.scorer.predictor
        version = self.served.name
        in_flight: deque[tuple[dict, list[int], Future]] = deque()
        considered = 0
        with (
            ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix=f"pool-{self.project}-fetch") as prefetch,
            ThreadPoolExecutor(1, thread_name_prefix=f"pool-{self.project}-upload") as self.uploader,
        ):
            try:
                tasks = self._tasks()
                exhausted = False
                self.scoring_started = time.monotonic()
                while True:
                    # keep PREFETCH images on their way while the model works on the oldest
                    while not exhausted and len(in_flight) < PREFETCH:
                        if self.limit is not None and considered >= self.limit:
                            exhausted = True
                            break
                        pool_task = next(tasks, None)
                        if pool_task is None:
                            exhausted = True
                            break
                        if self.shard is not None and int(pool_task.task["id"]) % self.shard[1] != self.shard[0]:
                            continue  # another rank's task
                        considered += 1
                        current = sorted(pid for pid, v in pool_task.own_predictions if v == version)
                        older = [pid for pid, v in pool_task.own_predictions if v != version]
                        if current:  # scored by this version before (a resumed job): keep the newest
                            self.to_delete.extend(older + current[:-1])
                            with self.scorer._lock:
                                self.state.already_current += 1
                            continue
                        future = prefetch.submit(self._prepare, pool_task.task)
                        in_flight.append((pool_task.task, older, future))
                    if not in_flight:
                        break
                    paused = predictor.gate.wait_for_requests(self.entry.cancel)  # requests first
                    if paused:
                        with self.scorer._lock:
                            self.state.request_wait_seconds += paused
                    self._check_cancel()
                    task, older, future = in_flight.popleft()
                    try:
                        waited = time.monotonic()
                        rgb = future.result()
                        computed = time.monotonic()
                        work = predictor.working_image(rgb)
                        result = predictor.predict_task(self.served, self.schema, task, work=work)
                        with self.scorer._lock:
                            self.state.image_wait_seconds += computed - waited
                            self.state.compute_seconds += time.monotonic() - computed
                    except (TaskError, ImageFetchError, ValueError) as error:
                        self._skip(task, str(error))
                        continue
                    except Exception as error:  # noqa: BLE001 - one odd task must not end the job
                        log.exception("project %s task %s: unexpected error in pool scoring", self.project, task["id"])
                        self._skip(task, f"{type(error).__name__}: {str(error)[:300]}")
                        continue
                    self.batch.append({"task": task["id"], **result})
                    self.to_delete.extend(older)
                    if len(self.batch) >= PUSH_BATCH:
                        self._flush()
                self._flush()
                self._wait_upload()
                if not self.switched and self.state.already_current and self.api.model_version() != version:
                    self.api.set_model_version(version)
            finally:
                for _, _, future in in_flight:
                    future.cancel()

    def _prepare(self, task: dict) -> np.ndarray:
        """In a prefetch thread: download and decode (RGB uint8), and the superpixels when regions
        are asked. No torch here: torch gives every calling thread its own OpenMP team, and
        idle teams spinning beside the model's would slow it down on a small machine."""
        predictor = self.scorer.predictor
        rgb = predictor.load_rgb(self.schema, task)
        predictor.prime_superpixels(self.schema, task, rgb)
        return rgb

    def _skip(self, task: dict, reason: str) -> None:
        log.warning("project %s task %s: skipped by pool scoring: %s", self.project, task.get("id"), reason)
        with self.scorer._lock:
            self.state.skipped += 1
            self.state.skipped_reasons = (self.state.skipped_reasons + [f"task {task.get('id')}: {reason}"])[
                -RECENT_SKIPS:
            ]
            self._progress()
        if self.on_progress is not None:
            self.on_progress()

    def _flush(self) -> None:
        """Hand the batch to the uploader thread, so the next batch is computed while this one
        travels; at most one batch waits (its error, if any, is raised here)."""
        self._wait_upload()
        batch, to_delete = self.batch, self.to_delete
        self.batch, self.to_delete = [], []
        if batch or to_delete:
            self.upload = self.uploader.submit(self._upload, batch, to_delete)

    def _wait_upload(self) -> None:
        if self.upload is not None:
            upload, self.upload = self.upload, None
            waited = time.monotonic()
            upload.result()
            with self.scorer._lock:
                self.state.api_wait_seconds += time.monotonic() - waited

    def _upload(self, batch: list[dict], to_delete: list[int]) -> None:
        if batch:
            self.api.push_predictions(batch)  # new ones first: a task never has none
            if not self.switched:
                self.api.set_model_version(self.served.name)
                self.switched = True
            with self.scorer._lock:
                self.state.done += len(batch)
                self._progress()
        deleted = 0
        for prediction_id in to_delete:
            try:
                self.api.delete_prediction(prediction_id)
                deleted += 1
            except Exception as error:  # noqa: BLE001 - e.g. deleted meanwhile by a person
                log.info("project %s: prediction %s not deleted: %s", self.project, prediction_id, _describe(error))
        with self.scorer._lock:
            self.state.superseded += deleted
        if self.on_progress is not None:
            self.on_progress()

    def _progress(self) -> None:
        """Rate and ETA; call with the scorer's lock held."""
        _rate_and_eta(self.state, time.monotonic() - (self.scoring_started or time.monotonic()))


def _rate_and_eta(state: PoolState, elapsed: float) -> None:
    """Set `state`'s tasks per second and ETA from its counts after `elapsed` seconds of scoring."""
    handled = state.done + state.skipped
    if handled and elapsed > 0:
        state.tasks_per_second = round(handled / elapsed, 3)
        left = max(state.total - handled - state.already_current, 0)
        state.eta_seconds = round(left / state.tasks_per_second, 1)


class ScoringFailed(RuntimeError):
    """A sharded pool job's processes failed; the message says how and why."""


class _ShardedJob:
    """A pool job in `ranks` processes (``backend.score_job`` under torchrun): each scores and
    pushes its share of the tasks (by task id); this thread follows their progress records
    into the project's PoolState, stops them on cancel, and says why they failed."""

    def __init__(self, scorer: PoolScorer, project: str, entry: _Project, served: ServedModel, ranks: int):
        self.scorer, self.project, self.entry, self.ranks = scorer, project, entry, ranks
        self.version = served.version
        self.state = entry.state
        self.shards: dict[int, dict] = {}  # rank -> its latest progress record

    def run(self) -> None:
        from .launcher import TrainingProcess
        from .runs import POLL_SECONDS
        from .score_job import LOG_NAME, MODULE, write_manifest

        settings = self.scorer.settings
        folder = new_scoring_folder(self.scorer.store.project_dir(self.project))
        process = None
        try:
            manifest = write_manifest(folder, project=self.project, version=self.version, settings=settings)
            process = TrainingProcess(
                manifest, self.ranks, cpu=self.scorer.store.device.type == "cpu", module=MODULE, log_name=LOG_NAME,
                extra_env={API_KEY_VARIABLE: settings.label_studio_api_key}, kind="scoring", nice=settings.job_nice,
            ).start()  # fmt: skip
            started = time.monotonic()
            # on the server's CPU the ranks pause while requests compute (backend.gate)
            cpu = self.scorer.store.device.type == "cpu"
            with self.scorer.predictor.gate.pausing(process) if cpu else contextlib.nullcontext():
                while True:
                    code = process.wait(POLL_SECONDS)
                    records = [r for r in process.records() if r.get("event") in ("shard", "finished")]
                    for record in records:
                        self.shards[int(record.get("rank", 0))] = record
                    if records:
                        self._update(time.monotonic() - started)
                    if code is not None:
                        break
                    if self.entry.cancel.is_set():
                        raise Cancelled()
            if code != 0:
                raise ScoringFailed(process.failure(code))
        finally:
            if process is not None:
                process.stop()  # only when this thread stops early: a cancel, an error here
            finish_scoring(folder)

    def _update(self, elapsed: float) -> None:
        shards = list(self.shards.values())
        limit = self.scorer.settings.score_pool or None
        remaining = max(int(shard.get("pool_remaining", 0)) for shard in shards)
        with self.scorer._lock:
            state = self.state
            state.phase = f"scoring pool ({self.ranks} processes)"
            state.total = remaining if limit is None else min(remaining, limit)
            for name in ("done", "already_current", "skipped", "superseded"):
                setattr(state, name, sum(int(shard.get(name, 0)) for shard in shards))
            for name in ("compute_seconds", "image_wait_seconds", "api_wait_seconds"):
                setattr(state, name, round(sum(float(shard.get(name, 0.0)) for shard in shards), 3))
            reasons = [reason for shard in shards for reason in shard.get("skipped_reasons", [])]
            state.rank_peak_rss_mib = [self.shards[rank].get("peak_rss_mib") for rank in sorted(self.shards)]
            state.skipped_reasons = reasons[-RECENT_SKIPS:]
            _rate_and_eta(state, elapsed)


API_KEY_VARIABLE = "SEGAL_SCORE_API_KEY"  # the scoring processes' Label Studio key (never in a file)
SCORING_DIR = "scoring"
LAST_SCORING_LOG = "last-scoring.log"


def new_scoring_folder(project_dir: Path) -> Path:
    """``<project dir>/scoring/<UTC time>-<pid>-<hex>/``, after removing the folders of jobs whose
    backend is gone (``backend.runs.clean_stale_folders``)."""
    from .runs import clean_stale_folders, new_run_folder

    clean_stale_folders(Path(project_dir) / SCORING_DIR)
    return new_run_folder(project_dir, SCORING_DIR)


def finish_scoring(folder: Path) -> None:
    """Keep the job's log as ``<project dir>/last-scoring.log`` and remove its folder."""
    from .runs import finish_run
    from .score_job import LOG_NAME

    finish_run(folder, LOG_NAME, LAST_SCORING_LOG)


def _describe(error: Exception) -> str:
    """An API error in one line (label-studio-sdk's ApiError repr holds every response header)."""
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    if status is not None:
        return f"Label Studio answered HTTP {status}: {str(body)[:200]}"
    return f"{type(error).__name__}: {str(error)[:300]}"
