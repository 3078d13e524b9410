"""Training jobs: pull every annotation of a project, train on the sparse labels, publish.

One job per project at a time, in a background thread, so /webhook answers at once
(Label Studio waits 1 s). A request that arrives while a job runs is remembered, and
all such requests become one follow-up run (with the annotations as they are then).
A failed job leaves the previous version serving; its error is kept for /health.

A run trains the student with CE + lambda * InfoNCE against the project's memory bank
(paper 004), publishes the EMA teacher, and fits the region projector (UMAP on the bank)
before publishing, so that no request ever waits for a UMAP fit.
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
from model.network import BayesianSegmenter, ModelConfig, build_model
from model.regions import RegionProjector
from model.training import TrainConfig, train

from .config import Settings
from .convert import annotation_to_labels
from .images import ImageFetcher, ImageFetchError
from .jobs import wait_for_job
from .label_config import LabelSchema, parse_label_config
from .labelstudio import LabelStudioProject
from .predictor import working_resolution
from .store import ModelStore, ServedModel

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    status: str = "idle"  # idle | running | succeeded | failed
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
    ):
        self.settings = settings
        self.store = store
        self.fetcher = fetcher
        self.source = source
        self.schemas = schemas  # label configs seen in /setup and /predict, by project
        self.listener = listener or TrainingListener()
        self._projects: dict[str, _Project] = {}
        self._lock = threading.Lock()

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
            state.step, state.total_steps, state.loss = 0, self.settings.train_steps, None
            state.seconds_per_step = state.eta_seconds = None
            state.annotations_since_training = 0
            state.runs += 1
        try:
            version = self.train_once(project, state)
        except Exception as error:  # noqa: BLE001 - a failed run must never take the server down
            log.exception("project %s: training failed; the previous model keeps serving", project)
            with self._lock:
                state.status, state.error, state.finished_at = "failed", f"{type(error).__name__}: {error}", time.time()
                state.phase = ""
            return
        with self._lock:
            state.status, state.version, state.finished_at = "succeeded", version, time.time()

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
        model = build_model(
            ModelConfig(
                num_classes=len(schema.classes),
                arch=settings.arch,
                encoder=settings.encoder,
                encoder_weights=settings.encoder_weights,
                dropout=settings.dropout,
            )
        )
        served = self.store.current(project)
        memory_bank = None
        if served.model is not None and served.classes == schema.classes:
            _continue_from(model, served.model)
            if served.memory_bank is not None:  # a copy: the served one stays as it was saved
                memory_bank = MemoryBank.from_state_dict(served.memory_bank.state_dict())
        model.to(self.store.device)
        crop = (
            min(settings.train_crop, max(image.shape[-2] for image, _ in samples)),
            min(settings.train_crop, max(image.shape[-1] for image, _ in samples)),
        )
        config = TrainConfig(
            steps=settings.train_steps,
            batch_size=settings.train_batch_size,
            crop_size=crop,
            seed=settings.seed,
            contrastive_weight=settings.contrastive_weight,
            ema_decay=settings.ema_decay,
        )
        log.info(
            "project %s: training on %d images, %d labeled pixels, %d steps",
            project, state.images, state.labeled_pixels, config.steps,
        )

        training_started = time.monotonic()

        def progress(step: int, total: int, loss: float) -> None:
            per_step = (time.monotonic() - training_started) / max(step, 1)
            with self._lock:
                state.step, state.total_steps, state.loss = step, total, loss
                state.seconds_per_step = round(per_step, 2)
                state.eta_seconds = round(per_step * (total - step), 1)
            if step % 10 == 0 or step == total:
                log.info("project %s: step %d/%d loss %.4f", project, step, total, loss)

        self._phase(state, "training")
        result = train(model, samples, config, progress, memory_bank=memory_bank)
        projector = None
        if result.memory_bank is not None:
            self._phase(state, "fitting region projector")
            projector = self._fit_projector(project, result.memory_bank)
        self._phase(state, "calibrating scores")
        teacher = result.teacher if result.teacher is not None else model
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
                "steps": result.steps,
                "final_loss": result.losses[-1] if result.losses else None,
                "final_contrastive_loss": result.contrastive_losses[-1] if result.contrastive_losses else None,
                "served": "ema_teacher" if result.teacher is not None else "student",
                "memory_bank_vectors": len(result.memory_bank) if result.memory_bank is not None else 0,
                "projector_fit_seconds": round(projector.fit_seconds, 1) if projector is not None else None,
                "seconds": round(result.seconds, 1),
                "score_scale": scale.to_dict() if scale is not None else None,
            },
            memory_bank=result.memory_bank,
            projector=projector,
        )
        self._phase(state, "")
        log.info("project %s: published %s (%.0f s)", project, served.name, result.seconds)
        return served.version

    def _fit_projector(self, project: str, memory_bank: MemoryBank) -> RegionProjector | None:
        vectors, _ = memory_bank.vectors()
        try:
            projector = RegionProjector.fit(vectors.cpu().numpy(), seed=self.settings.seed)
        except ValueError as error:  # e.g. too few correctly classified labeled pixels yet
            log.warning("project %s: no region projector this time (%s); regions ranked by entropy", project, error)
            return None
        projector.warm_up()  # compile the transform here, in the training thread, not in a request
        log.info(
            "project %s: region projector fitted on %d bank vectors in %.1f s",
            project, len(vectors), projector.fit_seconds,
        )
        return projector


def _continue_from(model: BayesianSegmenter, served: BayesianSegmenter) -> None:
    """Start from the served weights; a served model from before the projection head leaves
    the new head at its initialization."""
    missing, unexpected = model.load_state_dict(served.state_dict(), strict=False)
    new_head = all(name.startswith("projection.") for name in missing)
    if unexpected or not new_head:
        raise ValueError(
            f"The served model does not fit the configured network (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was SEGAL_ARCH or SEGAL_ENCODER changed? Move the old model-v*.pt files away."
        )
