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
from dataclasses import dataclass
from pathlib import Path

import torch

from model.calibration import ScoreScale
from model.checkpoint import load_checkpoint, save_checkpoint
from model.contrastive import MemoryBank
from model.network import BayesianSegmenter
from model.regions import RegionProjector

log = logging.getLogger(__name__)
_VERSION_FILE = re.compile(r"^model-v(\d+)\.pt$")


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
            except ValueError as error:
                log.error("model v%d: unreadable score scale (%s); task scores use a fixed map", self.version, error)

    @property
    def name(self) -> str:
        return f"segal-v{self.version}" if self.version else "segal-v0-untrained"


class ModelStore:
    def __init__(self, model_dir: Path, device: torch.device):
        self.model_dir = Path(model_dir)
        self.device = device
        self._served: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # guards _served and _loading; never held while loading
        self._loading: dict[str, threading.Lock] = {}  # per project: one load or publish at a time

    def project_dir(self, project: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", project) or project.startswith("."):
            raise ValueError(f"Invalid project id {project!r}.")
        return self.model_dir / project

    def versions(self, project: str) -> list[int]:
        folder = self.project_dir(project)
        if not folder.is_dir():
            return []
        found = (_VERSION_FILE.match(path.name) for path in folder.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def current(self, project: str) -> ServedModel:
        """The served model of a project, loading the newest good checkpoint on first use.

        Loading (a checkpoint, ``import umap`` and the projector's warm-up: seconds) holds
        only that project's lock, so requests for other projects are not held up.
        """
        with self._lock:
            served = self._served.get(project)
        if served is not None:
            return served
        with self._project_lock(project):
            with self._lock:
                served = self._served.get(project)  # loaded by the thread we waited for
            if served is None:
                served = self._load_latest(project)
                with self._lock:
                    self._served[project] = served
            return served

    def current_name(self, project: str) -> str:
        """The version name without loading anything (for /setup, which Label Studio gives 3 s):
        the served one if loaded, else the newest checkpoint on disk."""
        with self._lock:
            served = self._served.get(project)
        if served is not None:
            return served.name
        versions = self.versions(project)
        return ServedModel(None, versions[-1] if versions else 0, (), {}).name

    def stored_projects(self) -> list[str]:
        if not self.model_dir.is_dir():
            return []
        return sorted(p.name for p in self.model_dir.iterdir() if p.is_dir() and self.versions(p.name))

    def _load_latest(self, project: str) -> ServedModel:
        for version in reversed(self.versions(project)):
            path = self.project_dir(project) / f"model-v{version}.pt"
            try:
                model, meta = load_checkpoint(path, map_location=self.device)
            except (ValueError, OSError) as error:
                log.error("project %s: skipping unreadable checkpoint %s: %s", project, path, error)
                continue
            projector = self._load_projector(project, path.with_suffix(".umap"), meta["memory_bank"])
            log.info("project %s: serving %s", project, path)
            return ServedModel(
                model.eval(), version, tuple(meta["class_names"]), meta.get("extra", {}), meta["memory_bank"], projector
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
        projector.warm_up()  # UMAP's search compiles here (seconds), not in the first request's transform
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
            served = ServedModel(model.eval(), version, tuple(classes), extra, memory_bank, projector)
            with self._lock:
                self._served[project] = served
            return served

    def _project_lock(self, project: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(project, threading.Lock())

    def projects(self) -> dict[str, ServedModel]:
        with self._lock:
            return dict(self._served)
