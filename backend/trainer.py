"""Training jobs: pull every annotation of a project, train on the sparse labels, publish.

One job per project at a time, in a background thread, so /webhook answers at once
(Label Studio waits 1 s). A request that arrives while a job runs is remembered, and
all such requests become one follow-up run (with the annotations as they are then).
A failed job leaves the previous version serving; its error is kept for /health.

A run trains the student with CE + lambda * InfoNCE against the project's memory bank
(paper 004), publishes the EMA teacher, and fits the region projector (UMAP on the bank)
before publishing, so that no request ever waits for a UMAP fit.

The training itself runs in a process of its own (``segal-train`` on a run folder:
``backend.runs``, ``backend.launcher``), alone or as SEGAL_TRAIN_PROCS DistributedDataParallel
ranks under torchrun, so that a crash or an out-of-memory kill of the training costs the run,
not the server. The rest (collecting, the projector fit, the score scale, publishing) stays
here. The projector is fitted here, not in the training process: UMAP's numba code compiles
in every fresh process (40 s and more), once per server here (a few seconds a fit after that),
the bank it is fitted on is small (at most 1000 vectors per class), and the serving process
must compile UMAP's transform anyway.

Replicas sharing MODEL_DIR take the project's training lock (``backend.runs.TrainingLock``)
for a run; one that finds it taken waits ("training running in another replica"), then
trains on the annotations as they are then, from the version the other replica published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from model.calibration import ScoreScale
from model.contrastive import MemoryBank
from model.data import IGNORE_INDEX
from model.network import BayesianSegmenter, ModelConfig
from model.regions import RegionProjector, warm_up_umap
from model.training import TrainConfig, auto_steps

from .config import Settings
from .gate import RequestGate
from .convert import annotation_to_labels
from .images import ImageFetcher, ImageFetchError
from .jobs import wait_for_job
from .label_config import LabelSchema, parse_label_config
from .labelstudio import LabelStudioProject
from .predictor import working_resolution
from .runs import RUNS_DIR, TrainingFailed, TrainingLock, clean_stale_runs, run_training
from .store import ModelStore, ServedModel, is_project_id

log = logging.getLogger(__name__)
LOCK_POLL_SECONDS = 2.0  # while another replica trains the project: how often its lock is tried


@dataclass
class TrainingState:
    status: str = "idle"  # idle | waiting (another replica trains the project) | running | succeeded | failed
    phase: str = ""  # while running: collecting | training | fitting region projector | calibrating scores | saving
    reason: str = ""  # what asked for the current / last run
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    seconds_per_step: float | None = None  # while training: mean over the steps so far
    eta_seconds: float | None = None  # while training: the steps left at that pace
    images: int = 0
    labeled_pixels: int = 0
    skipped_regions: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    version: int = 0  # the version the last successful run published
    runs: int = 0
    follow_up_queued: bool = False
    annotations_since_training: int = 0
    processes: int = 0  # training processes of the current / last run (DDP ranks)
    pid: int | None = None  # while training: the training process (torchrun with several)
    nice: int | None = None  # the training process's nice value (SEGAL_JOB_NICE: requests first)

    def snapshot(self) -> dict:
        return asdict(self)


class ProjectSource:
    """Where a project's label config and annotations come from (Label Studio's API)."""

    def __init__(self, client_factory: Callable[[str], object]):
        self.client_factory = client_factory

    def label_config(self, project: str) -> str:
        return LabelStudioProject(self.client_factory, project).label_config()

    def annotated_tasks(self, project: str) -> list[dict]:
        client = self.client_factory(project)
        tasks = []
        for task in client.tasks.list(project=int(project), fields="all", only_annotated=True):
            tasks.append(task.model_dump() if hasattr(task, "model_dump") else dict(task))
        return tasks


@dataclass
class _Project:
    state: TrainingState = field(default_factory=TrainingState)
    thread: threading.Thread | None = None
    pending: bool = False


class TrainingListener:
    """What the trainer tells the rest of the backend (the pool scorer); no-ops by default."""

    def training_started(self, project: str) -> None:
        pass

    def training_finished(self, project: str, version: int | None) -> None:
        """`version`: the one published last, None when the last run failed."""

    def fit_score_scale(self, project: str, candidate: ServedModel, schema: LabelSchema, samples) -> ScoreScale | None:
        return None


class Trainer:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        fetcher: ImageFetcher,
        source: ProjectSource,
        schemas: dict[str, LabelSchema],
        listener: TrainingListener | None = None,
        gate: RequestGate | None = None,
    ):
        self.settings = settings
        self.store = store
        self.fetcher = fetcher
        self.source = source
        self.schemas = schemas  # label configs seen in /setup and /predict, by project
        self.listener = listener or TrainingListener()
        # /predict's gate: a training on this machine's CPU pauses while requests compute
        self.gate = gate
        self._projects: dict[str, _Project] = {}
        self._lock = threading.Lock()
        self.lock_poll_seconds = LOCK_POLL_SECONDS
        self._clean_stale_runs()

    def _clean_stale_runs(self) -> None:
        """Run folders (and trainer processes) a dead backend left; projects another replica is
        training keep theirs."""
        try:
            folders = [p for p in self.store.model_dir.iterdir() if is_project_id(p.name) and (p / RUNS_DIR).is_dir()]
        except OSError:
            return
        for folder in folders:
            lock = TrainingLock(folder)
            try:
                if lock.try_acquire():
                    clean_stale_runs(folder)
            except OSError as error:
                log.warning("project %s: could not clean its stale training runs: %s", folder.name, error)
            finally:
                lock.release()

    def _project(self, project: str) -> _Project:
        return self._projects.setdefault(project, _Project())

    def request(self, project: str, reason: str) -> dict:
        """Start a run now, or queue one follow-up if a run is going."""
        with self._lock:
            entry = self._project(project)
            if entry.thread is not None and entry.thread.is_alive():
                entry.pending = True
                entry.state.follow_up_queued = True
                log.info("project %s: training already running; one follow-up run queued (%s)", project, reason)
                return entry.state.snapshot()
            entry.state.reason = reason
            entry.thread = threading.Thread(target=self._loop, args=(project,), name=f"train-{project}", daemon=True)
            entry.state.status = "running"
            entry.thread.start()
            return entry.state.snapshot()

    def note_annotation_change(self, project: str) -> bool:
        """Count an annotation event; start training every SEGAL_TRAIN_EVERY of them."""
        with self._lock:
            state = self._project(project).state
            state.annotations_since_training += 1
            due = self.settings.train_every > 0 and state.annotations_since_training >= self.settings.train_every
        if due:
            self.request(project, f"{self.settings.train_every} new annotation events")
        return due

    def states(self) -> dict[str, dict]:
        with self._lock:
            return {project: entry.state.snapshot() for project, entry in self._projects.items()}

    def wait(self, project: str, timeout: float | None = None) -> None:
        """Block until the project's current run (and its follow-up) ends; for tests and shutdown."""

        def current() -> threading.Thread | None:
            with self._lock:
                return self._project(project).thread

        wait_for_job(current, timeout)

    def _loop(self, project: str) -> None:
        self.listener.training_started(project)  # e.g. pool scoring yields the CPU
        while True:
            self._run_once(project)
            with self._lock:
                entry = self._project(project)
                if not entry.pending:
                    succeeded = entry.state.status == "succeeded"
                    version = entry.state.version if succeeded else None
                    break
                entry.pending = False
                entry.state.follow_up_queued = False
                entry.state.reason = "follow-up of requests made during the last run"
                entry.state.status = "running"
        self.listener.training_finished(project, version)

    def _run_once(self, project: str) -> None:
        state = self._project(project).state
        with self._lock:
            state.started_at, state.finished_at, state.error = time.time(), None, None
            state.step, state.total_steps, state.loss = 0, self.settings.train_steps or 0, None
            state.seconds_per_step = state.eta_seconds = None
            state.annotations_since_training = 0
            state.runs += 1
            state.pid, state.processes = None, 0
        lock = TrainingLock(self.store.project_dir(project))
        try:
            self._take_lock(project, lock, state)
            version = self.train_once(project, state)
        except Exception as error:  # noqa: BLE001 - a failed run must never take the server down
            if isinstance(error, TrainingFailed):  # its message says it all; no traceback of this thread
                log.error("project %s: training failed; the previous model keeps serving: %s", project, error)
            else:
                log.exception("project %s: training failed; the previous model keeps serving", project)
            with self._lock:
                state.status, state.error, state.finished_at = "failed", f"{type(error).__name__}: {error}", time.time()
                state.phase, state.pid = "", None
            return
        finally:
            lock.release()
        with self._lock:
            state.status, state.version, state.finished_at = "succeeded", version, time.time()

    def _take_lock(self, project: str, lock: TrainingLock, state: TrainingState) -> None:
        """Hold the project's training lock; while another replica holds it, wait and say so."""
        waited = False
        while not lock.try_acquire():
            if not waited:
                log.info("project %s: training running in another replica (%s); waiting for it", project, lock.holder())
            waited = True
            with self._lock:
                state.status, state.phase = "waiting", f"training running in another replica ({lock.holder()})"
            time.sleep(self.lock_poll_seconds)
        with self._lock:
            state.status, state.phase = "running", ""
            state.started_at = time.time()
        if waited:
            self.store.refresh(project)  # continue from the version the other replica published

    def _schema(self, project: str) -> LabelSchema:
        try:
            schema = parse_label_config(self.source.label_config(project))
            self.schemas[project] = schema
            return schema
        except Exception as error:  # noqa: BLE001 - fall back to the config seen in /setup
            if project in self.schemas:
                log.warning("project %s: could not read the label config (%s); using the one from /setup", project, error)
                return self.schemas[project]
            raise

    def collect(self, project: str, schema: LabelSchema) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """(image, sparse labels) per annotated task at the working resolution; skipped-region count."""
        samples, skipped_total = [], 0
        for task in self.source.annotated_tasks(project):
            annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
            if not annotations:
                continue
            try:
                image = working_resolution(self.fetcher.fetch(task["data"][schema.image_key]), self.settings.max_side)
            except (ImageFetchError, KeyError, TypeError) as error:
                log.warning("project %s task %s: skipped for training: %s", project, task.get("id"), error)
                continue
            height, width = image.shape[-2:]
            merged = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
            # several annotators: paint in update order, the newest statement wins where they overlap
            for annotation in sorted(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or "")):
                labels, skipped = annotation_to_labels(
                    annotation.get("result") or [], schema.class_index, width, height, controls=schema.result_types
                )
                for reason in skipped:
                    log.warning("project %s task %s: region skipped: %s", project, task.get("id"), reason)
                skipped_total += len(skipped)
                merged = np.where(labels != IGNORE_INDEX, labels, merged)
            if (merged != IGNORE_INDEX).any():
                samples.append((image, torch.from_numpy(merged)))
        return samples, skipped_total

    def _phase(self, state: TrainingState, phase: str) -> None:
        with self._lock:
            state.phase = phase

    def train_once(self, project: str, state: TrainingState) -> int:
        settings = self.settings
        self._phase(state, "collecting")
        schema = self._schema(project)
        samples, skipped = self.collect(project, schema)
        if not samples:
            raise ValueError("no usable annotation yet: label some points or regions, then start training again")
        with self._lock:
            state.images = len(samples)
            state.labeled_pixels = int(sum(int((labels != IGNORE_INDEX).sum()) for _, labels in samples))
            state.skipped_regions = skipped
        model_config = ModelConfig(
            num_classes=len(schema.classes),
            arch=settings.arch,
            encoder=settings.encoder,
            encoder_weights=settings.encoder_weights,
            dropout=settings.dropout,
        )
        served = self.store.current(project)
        warm_start = served.model is not None and served.classes == schema.classes
        config = train_config(settings, samples, warm_start=warm_start)
        procs = train_processes(settings, self.store.device, config.batch_size)
        log.info(
            "project %s: training on %d images, %d labeled pixels, %d steps, %d process(es)",
            project, state.images, state.labeled_pixels, config.steps, procs,
        )

        def follow(record: dict) -> None:
            """A record of the training process's progress file (backend.train_job)."""
            with self._lock:
                if record.get("event") == "started":
                    state.total_steps = record.get("total", config.steps)
                    state.processes = record.get("processes", procs)
                    state.nice = record.get("nice")
                if record.get("event") != "step":
                    return
                step, total, loss = record["step"], record["total"], record["loss"]
                state.step, state.total_steps, state.loss = step, total, loss
                state.seconds_per_step = round(record["seconds_per_step"], 2)
                state.eta_seconds = record["eta_seconds"]
            if step % 10 == 0 or step == total:
                log.info("project %s: step %d/%d loss %.4f", project, step, total, loss)

        def started(process) -> None:
            with self._lock:
                state.pid, state.processes = process.pid, procs

        self._phase(state, "training")
        # on the server's own CPU the run pauses while requests compute (backend.gate)
        local_cpu = self.store.device.type == "cpu" and not settings.train_command
        result = TrainedRun(*run_training(
            self.store.project_dir(project), classes=schema.classes, model_config=model_config, train_config=config,
            samples=samples, device=str(self.store.device),
            init_checkpoint=self.store.project_dir(project) / f"model-v{served.version}.pt" if warm_start else None,
            procs=procs, command_template=settings.train_command, on_record=follow, on_start=started,
            nice=settings.job_nice, gate=self.gate if local_cpu else None,
        ))  # fmt: skip
        with self._lock:
            state.pid = None
        projector = None
        if result.memory_bank is not None:
            self._phase(state, "fitting region projector")
            projector = self._fit_projector(project, result.memory_bank)
        self._phase(state, "calibrating scores")
        teacher = result.model
        candidate = ServedModel(teacher.eval(), 0, schema.classes, {}, result.memory_bank, projector)
        try:
            scale = self.listener.fit_score_scale(project, candidate, schema, samples)
        except Exception:  # noqa: BLE001 - scores on a fixed map are better than no new version
            log.exception("project %s: fitting the score scale failed; task scores use a fixed map", project)
            scale = None
        self._phase(state, "saving")
        served = self.store.publish(
            project,
            teacher,
            schema.classes,
            extra={
                "images": state.images,
                "labeled_pixels": state.labeled_pixels,
                "steps": result.summary.get("steps"),
                "nonfinite_steps": result.summary.get("nonfinite_steps"),
                "final_loss": result.summary.get("final_loss"),
                "final_contrastive_loss": result.summary.get("final_contrastive_loss"),
                "final_pseudo_loss": result.summary.get("final_pseudo_loss"),
                "served": result.summary.get("served"),
                "teacher_accuracy": result.summary.get("teacher_accuracy"),
                "student_accuracy": result.summary.get("student_accuracy"),
                "memory_bank_vectors": len(result.memory_bank) if result.memory_bank is not None else 0,
                "projector_fit_seconds": round(projector.fit_seconds, 1) if projector is not None else None,
                "seconds": result.summary.get("seconds"),
                "train_processes": result.summary.get("processes"),
                "precision": result.summary.get("precision"),
                "score_scale": scale.to_dict() if scale is not None else None,
            },
            memory_bank=result.memory_bank,
            projector=projector,
        )
        self._phase(state, "")
        log.info("project %s: published %s (training %s s)", project, served.name, result.summary.get("seconds"))
        return served.version

    def _fit_projector(self, project: str, memory_bank: MemoryBank) -> RegionProjector | None:
        vectors, _ = memory_bank.vectors()
        warm_up_umap()  # no-op once the server's start-up warm-up ran (it waits for one under way)
        try:
            projector = RegionProjector.fit(vectors.cpu().numpy(), seed=self.settings.seed)
        except ValueError as error:  # e.g. too few correctly classified labeled pixels yet
            log.warning("project %s: no region projector this time (%s); regions ranked by entropy", project, error)
            return None
        log.info(
            "project %s: region projector fitted on %d bank vectors in %.1f s",
            project, len(vectors), projector.fit_seconds,
        )
        return projector


def train_config(settings: Settings, samples, warm_start: bool) -> TrainConfig:
    """The TrainConfig of a run on `samples` ``[(image [3, H, W], labels [H, W])]``; `warm_start`:
    it continues from the served model (fewer steps under the automatic schedule)."""
    crop = (
        min(settings.train_crop, max(image.shape[-2] for image, _ in samples)),
        min(settings.train_crop, max(image.shape[-1] for image, _ in samples)),
    )
    steps = settings.train_steps
    if steps is None:
        steps = auto_steps(len(samples), settings.train_batch_size, warm_start)
    return TrainConfig(
        steps=steps,
        batch_size=settings.train_batch_size,
        crop_size=crop,
        seed=settings.seed,
        contrastive_weight=settings.contrastive_weight,
        ema_decay=settings.ema_decay,
        precision=settings.train_precision,
        channels_last=settings.train_channels_last,
        semi_supervised=settings.semi_supervised,
    )


@dataclass
class TrainedRun:
    """What a training process produced: the network to serve, its bank, its summary."""

    model: BayesianSegmenter
    memory_bank: MemoryBank | None
    summary: dict  # steps, final_loss, final_contrastive_loss, final_pseudo_loss, served, seconds, ...


def train_processes(settings: Settings, device: torch.device, batch_size: int) -> int:
    """How many training processes a run gets: SEGAL_TRAIN_PROCS, by default one per visible
    GPU on CUDA (one on CPU or a named GPU), capped so that the global batch splits evenly
    with at least 2 images per process on CPU (1 on CUDA, where SyncBatchNorm spans them)."""
    wanted = settings.train_procs
    if wanted is None:
        wanted = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 1
    per_process = 1 if device.type == "cuda" else 2
    usable = max(
        (n for n in range(1, max(wanted, 1) + 1) if batch_size % n == 0 and batch_size // n >= per_process), default=1
    )
    if usable < wanted:
        log.warning(
            "training on %d of the %d processes asked for: a global batch of %d (SEGAL_TRAIN_BATCH_SIZE) splits "
            "into at most %d shares of %d+ images; raise SEGAL_TRAIN_BATCH_SIZE to use more",
            usable, wanted, batch_size, usable, per_process,
        )
    return usable
