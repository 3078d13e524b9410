"""Saving and loading trained models with the metadata needed to use them.

A checkpoint is one ``torch.save`` file holding a plain dict: the state dict, the
``ModelConfig`` as a dict, the class names, a model version (an int the caller counts up,
e.g. one per training round) and free-form JSON-like ``extra``. Everything but the tensors
is JSON-compatible, so ``torch.load(weights_only=True)`` reads it: loading never unpickles
arbitrary objects.

Saving is atomic: the file is written to a temporary name in the target directory, flushed
and fsynced, then moved over the target with ``os.replace``. A crash or error mid-save
leaves the previous checkpoint as it was; a reader never sees a half-written file.

Loading rebuilds the network from the stored config with ``encoder_weights=None``: the
weights come from the checkpoint, so the packaged or hub encoder weights need not be read
(or downloaded) again. The returned model's ``config`` is the stored one, unchanged.

A contrastive model's memory bank (``model.contrastive.MemoryBank``, paper 004) is stored
beside the weights as plain tensors: the next training run continues its queues, and the
region acquisition's UMAP is fitted on it. Format 1 files (before the projection head) load
as models without a projection head and without a bank.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .contrastive import MemoryBank
from .files import atomic_write
from .network import BayesianSegmenter, ModelConfig, build_model

CHECKPOINT_FORMAT = "bayesian-segmenter-checkpoint"
CHECKPOINT_FORMAT_VERSION = 2  # 2: projection head in the config, optional memory bank


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be JSON-compatible (dict/list/str/int/float/bool/None): {error}") from error


def save_checkpoint(
    path: str | Path,
    model: BayesianSegmenter,
    *,
    class_names: list[str] | tuple[str, ...],
    version: int,
    extra: dict | None = None,
    memory_bank: MemoryBank | None = None,
) -> Path:
    """Atomically write `model`, its metadata and, if given, its memory bank to `path`
    (parent folders are created)."""
    path = Path(path)
    class_names = [str(name) for name in class_names]
    if len(class_names) != model.num_classes:
        raise ValueError(f"Got {len(class_names)} class names for a model with {model.num_classes} classes.")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}.")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}.")
    _check_json("extra", extra)
    if memory_bank is not None and (memory_bank.num_classes, memory_bank.dim) != (
        model.num_classes,
        model.config.projection_dim,
    ):
        raise ValueError(
            f"The memory bank holds {memory_bank.num_classes} classes of {memory_bank.dim}-d vectors; the model has "
            f"{model.num_classes} classes and {model.config.projection_dim}-d embeddings."
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": version,
        "class_names": class_names,
        "model_config": model.config.to_dict(),
        "extra": extra,
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "memory_bank": None if memory_bank is None else memory_bank.state_dict(),
    }
    return atomic_write(path, lambda file: torch.save(payload, file))


def _short(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read(path: Path, map_location: str | torch.device) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or not a torch file): "
            f"{type(error).__name__}: {_short(error)}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a torch file but not a checkpoint written by save_checkpoint.")
    format_version = payload.get("format_version")
    if not isinstance(format_version, int) or format_version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {format_version!r}; this code reads up to "
            f"{CHECKPOINT_FORMAT_VERSION}. Update the project to load it."
        )
    missing = [key for key in ("state_dict", "model_config", "class_names", "version") if key not in payload]
    if missing:
        raise ValueError(f"{path} is missing checkpoint fields {missing}.")
    return payload


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[BayesianSegmenter, dict]:
    """Model (eval mode, on `map_location`) and metadata from a `save_checkpoint` file.

    Metadata keys: ``class_names``, ``version``, ``created``, ``extra``, ``model_config``,
    ``format_version``, ``memory_bank`` (a ``MemoryBank`` on the CPU, or None).
    """
    path = Path(path)
    payload = _read(path, map_location)
    stored_config = dict(payload["model_config"])
    stored_config.setdefault("projection_dim", 0)  # format 1: no projection head
    try:
        config = ModelConfig.from_dict(stored_config)
        model = build_model(dataclasses.replace(config, encoder_weights=None))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} holds a model config this code cannot build: {error}") from error
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: the stored weights do not fit the stored model config ({config.arch}, "
            f"{config.encoder}, {config.num_classes} classes): {_short(error)}"
        ) from error
    model.config = config
    model.to(map_location).eval()
    memory_bank = None
    if payload.get("memory_bank") is not None:
        try:
            memory_bank = MemoryBank.from_state_dict(payload["memory_bank"])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    metadata = {
        "class_names": list(payload["class_names"]),
        "version": payload["version"],
        "created": payload.get("created"),
        "extra": payload.get("extra", {}),
        "model_config": config.to_dict(),
        "format_version": payload["format_version"],
        "memory_bank": memory_bank,
    }
    return model, metadata
