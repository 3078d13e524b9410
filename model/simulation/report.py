"""A run's metrics on disk: ``metrics.csv`` (one row per cycle) and ``metrics.json``.

Columns, in order (``METRIC_COLUMNS``, then ``iou_<class>`` per class):

- ``cycle``: 1-based; cycle 1 trained on the cold start
- ``labeled_pixels``, ``labeled_per_image``, ``labeled_percent``: non-void labeled pixels the
  cycle trained on, in total, per image, and as a percentage of all pool pixels
- ``queried_per_image``: pixels (pixel mode) or superpixels (region mode) added for the cycle
- ``miou``: mean IoU on the evaluation split (void ignored; classes absent from truth and
  prediction left out)
- ``pair_distance``: mean pairwise distance of the cycle's queries within an image, in pixels
  of the unscaled image (region mode: between region centroids); ``unique_labels``: mean
  number of distinct true labels among them (paper 000, Fig. 6)
- ``train_loss``: mean loss of the last tenth of the training steps (umap-kmeans: CE + 0.1 InfoNCE)
- ``projector_vectors``: memory-bank vectors the cycle's UMAP was fitted on (umap-kmeans); 0
  when no projector was fitted: a rank run, or a umap-kmeans cycle whose bank was too small,
  whose queries were then ranked by summed score
- ``train_seconds``, ``eval_seconds``, ``projector_seconds`` (the UMAP fit), ``acquire_seconds``
  (MC dropout and the choice), ``wall_seconds`` (their sum, and the saving), ``finished_at``

Both files are derived from ``state.npz`` and rewritten whole after every cycle (atomically);
empty CSV cells and JSON nulls are undefined values (NaN): e.g. the supervised reference has
no queries, so no diversity figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .config import SimulationConfig
from ..files import atomic_write
from .state import to_json

METRIC_COLUMNS = (
    "cycle",
    "labeled_pixels",
    "labeled_per_image",
    "labeled_percent",
    "queried_per_image",
    "miou",
    "pair_distance",
    "unique_labels",
    "train_loss",
    "projector_vectors",
    "train_seconds",
    "eval_seconds",
    "projector_seconds",
    "acquire_seconds",
    "wall_seconds",
    "finished_at",
)


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def write_metrics(folder: Path, config: SimulationConfig, rows: list[dict], classes: list[str], info: dict) -> None:
    columns = [*METRIC_COLUMNS, *(f"iou_{name}" for name in classes)]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column, math.nan)) for column in columns])
    atomic_write(folder / "metrics.csv", lambda file: file.write(text.getvalue().encode()))
    document = {"run": config.run_name, "config": config.to_dict(), "classes": classes, "pool": info, "cycles": rows}
    atomic_write(folder / "metrics.json", lambda file: file.write(to_json(document).encode()))


def read_metrics(folder: Path) -> dict:
    """``metrics.json`` of a run folder, nulls back to NaN in the cycle rows."""
    document = json.loads((folder / "metrics.json").read_text())
    document["cycles"] = [
        {key: (math.nan if value is None else value) for key, value in row.items()} for row in document["cycles"]
    ]
    return document
