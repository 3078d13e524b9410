"""Model versions per project: ``<MODEL_DIR>/<project>/model-v<N>.pt``.

Each finished training run writes a new version atomically (``model.checkpoint``); the
highest version that loads is the one served, so a restart picks it up and a crash in the
middle of a save never leaves a broken "latest". Version 0 means "not trained yet".

A contrastive model has a memory bank (inside the checkpoint) and a region projector, the
UMAP fitted on that bank after training (``model-v<N>.umap``, written before the checkpoint
so that a checkpoint never points at a missing projector). Without a projector (fit failed,
file unreadable, a model from before contrastive training) the regions fall back to the
plain entropy ranking.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model.calibration import ScoreScale, StaleScoreScale
from model.checkpoint import load_checkpoint, save_checkpoint
from model.contrastive import MemoryBank
from model.folding import fold_batch_norms
from model.files import remove_interrupted_writes
from model.network import BayesianSegmenter
from model.regions import RegionProjector

from .runs import TrainingLock

log = logging.getLogger(__name__)
_VERSION_FILE = re.compile(r"^model-v(\d+)\.pt$")
PICK_UP_SECONDS = 10.0  # how often a served project's folder is checked for another replica's new version
MAX_PROJECT_ID_DIGITS = 18  # Label Studio's ids are 64-bit integers; more digits is not an id
_PROJECT_ID = re.compile(r"[0-9]{1,%d}" % MAX_PROJECT_ID_DIGITS)  # ASCII digits only, unlike str.isdigit


def is_project_id(text: str) -> bool:
    return isinstance(text, str) and _PROJECT_ID.fullmatch(text) is not None


class ModelDirError(ValueError):
    """MODEL_DIR cannot hold checkpoints; the message names the folder and the fix."""


def prepare_model_dir(model_dir: Path) -> Path:
    """Create MODEL_DIR if missing and check that files can be written in it; raises ModelDirError."""
    folder = Path(model_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{uuid.uuid4().hex}.tmp"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as error:
        kind = "not a directory" if folder.exists() and not folder.is_dir() else "not a writable directory"
        raise ModelDirError(
            f"MODEL_DIR={str(folder)!r} is {kind} ({error.strerror or error}). Point MODEL_DIR at a folder the "
            "backend's user can write (it is created if missing)."
        ) from None
    return folder


@dataclass
class ServedModel:
    model: BayesianSegmenter | None  # None before the first training
    version: int
    classes: tuple[str, ...]
    extra: dict
    memory_bank: MemoryBank | None = None
    projector: RegionProjector | None = None  # UMAP on the memory bank, for region selection
    score_scale: ScoreScale | None = None  # task values -> [0, 1], fitted on the pool after training

    def __post_init__(self):
        if self.score_scale is None and isinstance(self.extra.get("score_scale"), dict):
            try:
                self.score_scale = ScoreScale.from_dict(self.extra["score_scale"])
            except StaleScoreScale as error:  # saved by an older backend: the next training fits a new one
                log.warning("model v%d: score scale not used, %s; task scores use a fixed map until the next "
                            "training run", self.version, error)  # fmt: skip
            except ValueError as error:
                log.error("model v%d: unreadable score scale (%s); task scores use a fixed map", self.version, error)

    @property
    def name(self) -> str:
        return f"segal-v{self.version}" if self.version else "segal-v0-untrained"


def for_serving(model: BayesianSegmenter) -> BayesianSegmenter:
    """The model to serve: an eval-mode copy with its BatchNorms folded into the convolutions
    (``model.folding``: 0.89x the forward's time on a CPU; `model` itself stays trainable), in
    channels-last on a CPU: oneDNN's convolutions take NHWC activations about 0.8x the time (a
    480x360 forward 43 against 55 ms here, the MC moments 61 against 76 ms, the same values to
    1e-8). Channels-last was not measured on a GPU, so it is left out there."""
    model = fold_batch_norms(model)
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


class ModelStore:
    def __init__(self, model_dir: Path, device: torch.device):
        self.model_dir = Path(model_dir)
        self.device = device
        self._served: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # guards _served and _loading; never held while loading
        self._loading: dict[str, threading.Lock] = {}  # per project: one load or publish at a time
        self._unreadable: set[Path] = set()  # checkpoints a load found broken: never named as current
        self._checked: dict[str, float] = {}  # per project: when the folder was last looked at for newer versions
        self._picking_up: set[str] = set()  # projects whose newer version is loading in the background
        prepare_model_dir(self.model_dir)
        remove_interrupted_writes(self.model_dir)
        for folder in self._project_folders():  # from a kill or a full disk during a save
            lock = TrainingLock(folder)  # a replica sharing MODEL_DIR may be saving there right now
            try:
                if lock.try_acquire():
                    remove_interrupted_writes(folder)
            except OSError as error:
                log.warning("%s: could not look for interrupted writes: %s", folder, error)
            finally:
                lock.release()

    def project_dir(self, project: str) -> Path:
        if not is_project_id(project):
            raise ValueError(f"Invalid project id {project[:40]!r}: ASCII digits, at most {MAX_PROJECT_ID_DIGITS}.")
        return self.model_dir / project

    def _project_folders(self) -> list[Path]:
        try:
            return [p for p in self.model_dir.iterdir() if is_project_id(p.name) and p.is_dir()]
        except OSError:
            return []

    def versions(self, project: str) -> list[int]:
        folder = self.project_dir(project)
        if not folder.is_dir():
            return []
        found = (_VERSION_FILE.match(path.name) for path in folder.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def current(self, project: str) -> ServedModel:
        """The served model of a project, loading the newest good checkpoint on first use.

        Loading (a checkpoint, ``import umap`` and the projector's warm-up: seconds) holds
        only that project's lock, so requests for other projects are not held up. A version
        that another replica sharing MODEL_DIR published is picked up within
        ``PICK_UP_SECONDS``, loaded in the background while the loaded one keeps serving.
        """
        with self._lock:
            served = self._served.get(project)
        if served is not None:
            self._pick_up_newer(project, served)
            return served
        with self._project_lock(project):
            with self._lock:
                served = self._served.get(project)  # loaded by the thread we waited for
            if served is None:
                served = self._load_latest(project)
                with self._lock:
                    self._served[project] = served
            return served

    def refresh(self, project: str) -> ServedModel:
        """Serve the newest loadable checkpoint on disk when it is newer than the served one
        (published by another replica); returns the served model."""
        with self._project_lock(project):
            with self._lock:
                served = self._served.get(project)
            if served is not None and self._newest_on_disk(project) <= served.version:
                return served
            loaded = self._load_latest(project)
            if served is None or loaded.version > served.version:
                if served is not None:
                    log.info("project %s: serving %s, published by another replica", project, loaded.name)
                with self._lock:
                    self._served[project] = served = loaded
            return served

    def _newest_on_disk(self, project: str) -> int:
        folder = self.project_dir(project)
        readable = [v for v in self.versions(project) if folder / f"model-v{v}.pt" not in self._unreadable]
        return readable[-1] if readable else 0

    def _pick_up_newer(self, project: str, served: ServedModel) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked.get(project, 0.0) < PICK_UP_SECONDS or project in self._picking_up:
                return
            self._checked[project] = now
        try:
            newer = self._newest_on_disk(project) > served.version
        except OSError:
            return
        if not newer:
            return
        with self._lock:
            self._picking_up.add(project)

        def pick_up() -> None:
            try:
                self.refresh(project)
            except Exception:  # noqa: BLE001 - the loaded version keeps serving
                log.exception("project %s: could not load the newer version on disk", project)
            finally:
                with self._lock:
                    self._picking_up.discard(project)

        threading.Thread(target=pick_up, name=f"pick-up-{project}", daemon=True).start()

    def current_name(self, project: str) -> str:
        """The version name without loading anything (for /setup, which Label Studio gives 3 s):
        the served one if loaded, else the newest checkpoint on disk that will load, as far as a
        cheap look tells (a complete zip with the pickle inside, and no failed load before): a
        truncated newest file is not named while the preload is still on its way to skip it."""
        with self._lock:
            served = self._served.get(project)
        if served is not None:
            return served.name
        version = next((v for v in reversed(self.versions(project)) if self._looks_loadable(project, v)), 0)
        return ServedModel(None, version, (), {}).name

    def _looks_loadable(self, project: str, version: int) -> bool:
        path = self.project_dir(project) / f"model-v{version}.pt"
        if path in self._unreadable:
            return False
        try:  # torch.save writes a zip; its directory is at the end, so a truncated file has none
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
        except (OSError, zipfile.BadZipFile, ValueError):
            return False

    def stored_projects(self) -> list[str]:
        return sorted(p.name for p in self._project_folders() if self.versions(p.name))

    def _load_latest(self, project: str) -> ServedModel:
        for version in reversed(self.versions(project)):
            path = self.project_dir(project) / f"model-v{version}.pt"
            try:
                model, meta = load_checkpoint(path, map_location=self.device)
            except (ValueError, OSError) as error:
                log.error("project %s: skipping unreadable checkpoint %s: %s", project, path, error)
                self._unreadable.add(path)
                continue
            projector = self._load_projector(project, path.with_suffix(".umap"), meta["memory_bank"])
            log.info("project %s: serving %s", project, path)
            return ServedModel(
                for_serving(model), version, tuple(meta["class_names"]), meta.get("extra", {}), meta["memory_bank"],
                projector,
            )
        return ServedModel(None, 0, (), {})

    @staticmethod
    def _load_projector(project: str, path: Path, memory_bank: MemoryBank | None) -> RegionProjector | None:
        if memory_bank is None or not path.exists():
            return None
        try:
            projector = RegionProjector.load(path)
        except (ValueError, OSError) as error:
            log.error("project %s: unreadable region projector %s (%s); regions ranked by entropy", project, path, error)
            return None
        projector.warm_up()
        return projector

    def publish(
        self,
        project: str,
        model: BayesianSegmenter,
        classes: tuple[str, ...],
        extra: dict,
        memory_bank: MemoryBank | None = None,
        projector: RegionProjector | None = None,
    ) -> ServedModel:
        """Save `model` (with its bank and projector) as the next version and serve it from now on."""
        with self._project_lock(project):  # numbering and saving, without holding up other projects
            existing = self.versions(project)
            version = (existing[-1] if existing else 0) + 1
            path = self.project_dir(project) / f"model-v{version}.pt"
            if projector is not None:
                projector.save(path.with_suffix(".umap"))
            save_checkpoint(
                path, model, class_names=list(classes), version=version, extra=extra, memory_bank=memory_bank
            )
            served = ServedModel(for_serving(model), version, tuple(classes), extra, memory_bank, projector)
            with self._lock:
                self._served[project] = served
            return served

    def _project_lock(self, project: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(project, threading.Lock())

    def projects(self) -> dict[str, ServedModel]:
        with self._lock:
            return dict(self._served)
