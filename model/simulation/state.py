"""A run's resumable state: one compressed ``state.npz``, replaced atomically after every cycle.

One file, not several, so that the labels, the metrics and the cycle counter can never
disagree after a crash: it is written to a temporary name in the same folder, fsynced, then
moved over the old one (``os.replace``). An interruption at any moment leaves either the
previous cycle's state or the new one.

Contents (``np.load(allow_pickle=False)`` reads all of it; no pickled objects):

- ``format``: ``"segal-simulation-state"``; ``completed``: cycles finished;
- ``config``, ``metrics``, ``names``: JSON text (the run's settings, one row per finished
  cycle, the pool's image names in order);
- ``revealed_at_<i>``: int16 ``[H, W]`` per pool image (see ``model.simulation.pool``); it
  already holds the queries made after the last finished cycle, for the next one;
- ``segments_<i>``: int32 ``[H, W]`` superpixels (region mode), stored so that a resumed
  run uses the very regions the first part used.

RNG state is not stored: every random stream is seeded from (seed, cycle, purpose), so a
resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write

STATE_FORMAT = "segal-simulation-state"
STATE_FILE = "state.npz"


@dataclass
class RunState:
    config: dict
    completed: int
    metrics: list[dict]
    names: list[str]
    revealed_at: list[np.ndarray]  # [H, W] int16 per pool image
    segments: list[np.ndarray] | None  # [H, W] int32 per pool image (region mode)


def to_json(value) -> str:
    """JSON with NaN and inf written as null (strict JSON readers reject NaN)."""

    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=1, allow_nan=False)


def save_state(folder: Path, state: RunState) -> Path:
    arrays = {
        "format": np.array(STATE_FORMAT),
        "completed": np.array(state.completed, dtype=np.int64),
        "config": np.array(to_json(state.config)),
        "metrics": np.array(to_json(state.metrics)),
        "names": np.array(json.dumps(state.names)),
    }
    for index, revealed in enumerate(state.revealed_at):
        arrays[f"revealed_at_{index}"] = revealed.astype(np.int16)
    for index, segments in enumerate(state.segments or []):
        arrays[f"segments_{index}"] = segments.astype(np.int32)
    path = folder / STATE_FILE
    atomic_write(path, lambda file: np.savez_compressed(file, **arrays))
    return path


def load_state(folder: Path) -> RunState | None:
    """The saved state of the run in `folder`, or None when it has none yet."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != STATE_FORMAT:
                raise ValueError("not a simulation state")
            names = json.loads(str(data["names"]))
            revealed = [data[f"revealed_at_{i}"] for i in range(len(names))]
            segments = [data[f"segments_{i}"] for i in range(len(names))] if "segments_0" in data else None
            return RunState(
                config=json.loads(str(data["config"])),
                completed=int(data["completed"]),
                metrics=_nan_for_null(json.loads(str(data["metrics"]))),
                names=names,
                revealed_at=revealed,
                segments=segments,
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path} cannot be read as a simulation state ({error}). Delete it (or the whole run folder "
            f"{folder}) to start the run over."
        ) from error


def _nan_for_null(rows: list[dict]) -> list[dict]:
    return [{key: (math.nan if value is None else value) for key, value in row.items()} for row in rows]
