"""Figures and the summary table comparing every run found in an output directory.

Runs are grouped by (mode, acquisition, selection, semi), labeled e.g. ``pixel balent``,
``region entropy`` (rank), ``region entropy umap-kmeans`` (paper 004's clustering, a
different training too, so never merged with rank runs) and ``pixel balent semi`` (paper
003's semi-supervised training); the seeds of a group are averaged
cycle by cycle (the band spans the lowest and highest seed). Written to ``<out>/``:

- ``miou_vs_labeled.png``: mIoU against % labeled pixels, one curve per group, the supervised
  reference as a dashed line (paper 000, Fig. 3);
- ``per_class_iou.png``: last-cycle IoU per class and group (paper 000, Fig. 7 shows gains);
- ``diversity.png``: pair distance and unique labels of the queries per cycle (Fig. 6);
- ``uncertainty_maps.png``: like paper 000, Fig. 2, on the first evaluation image (see
  ``uncertainty_figure``);
- ``summary.csv`` and ``summary.md``: one line per group (see ``summary_rows``).

Figures are plain ``matplotlib.figure.Figure`` objects saved by the Agg renderer: pyplot,
its global state and any display backend are never touched, so this runs headless.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ..acquisition import score_moments
from ..checkpoint import load_checkpoint
from ..data import IGNORE_INDEX
from ..mc_dropout import mc_moments, predict_probabilities
from .config import LEGACY_DEFAULTS, SUPERVISED, SimulationConfig
from .report import read_metrics
from .splits import load_split

DPI = 100


def collect_runs(out: Path) -> dict[str, list[dict]]:
    """``{group label: [metrics.json of each seed]}`` for every run folder under `out`."""
    groups: dict[str, list[dict]] = {}
    for path in sorted(Path(out).glob("*/metrics.json")):
        document = read_metrics(path.parent)
        if not document["cycles"]:
            continue
        groups.setdefault(run_label(document["config"]), []).append(document)
    return groups


def run_label(config: dict) -> str:
    """The group of a saved run config: ``supervised``, ``<mode> <acquisition>`` (rank) or
    ``<mode> <acquisition> <selection>``, `` contrastive`` for a rank run trained paper 004's way,
    `` decoder`` for pixel queries scored on the decoder's grid, `` head-all`` for contrastive
    training with the projection head on the whole map, `` tasks<K> <order>`` for K tasks per cycle,
    then `` semi`` for semi-supervised training."""
    config = {**LEGACY_DEFAULTS, **config}  # runs saved before the selection existed were rank
    if config["acquisition"] == SUPERVISED:
        return SUPERVISED
    label = f"{config['mode']} {config['acquisition']}"
    if config["selection"] != "rank":
        label = f"{label} {config['selection']}"
    elif config["training"] == "contrastive":
        label = f"{label} contrastive"
    if config["pixel_grid"] != "image":
        label = f"{label} {config['pixel_grid']}"
    if config["head_cells"] == "all" and SimulationConfig.from_dict(config).contrastive:
        label = f"{label} head-all"
    if config["tasks_per_cycle"] is not None:
        label = f"{label} tasks{config['tasks_per_cycle']} {config['task_order']}"
    return f"{label} semi" if config["semi"] else label


def _curve(documents: list[dict], key: str) -> np.ndarray:
    """``[seeds, cycles]`` of one column, cut to the cycles every seed has finished."""
    length = min(len(d["cycles"]) for d in documents)
    return np.array([[row.get(key, math.nan) for row in d["cycles"][:length]] for d in documents], dtype=np.float64)


def _nanmean(values: np.ndarray, axis=None):
    """np.nanmean without the warning for an all-NaN slice (e.g. no diversity for supervised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def summary_rows(groups: dict[str, list[dict]]) -> list[dict]:
    """Per group: last-cycle labeled % and mIoU (mean, sample std over seeds), mIoU averaged over
    all cycles and seeds (steadier than one cycle's), mean diversity of the acquired queries
    (cycles >= 2, so the random cold start every acquisition shares is left out), run time."""
    rows = []
    for label, documents in groups.items():
        miou = _curve(documents, "miou")[:, -1]
        acquired = slice(1, None)
        rows.append(
            {
                "run": label,
                "seeds": len(documents),
                "cycles": _curve(documents, "cycle").shape[1],
                "labeled_per_image": float(_curve(documents, "labeled_per_image")[:, -1].mean()),
                "labeled_percent": float(_curve(documents, "labeled_percent")[:, -1].mean()),
                "miou": float(miou.mean()),
                "miou_std": float(miou.std(ddof=1)) if len(miou) > 1 else math.nan,
                "miou_all_cycles": float(_curve(documents, "miou").mean()),
                "pair_distance": float(_nanmean(_curve(documents, "pair_distance")[:, acquired])),
                "unique_labels": float(_nanmean(_curve(documents, "unique_labels")[:, acquired])),
                "minutes_per_run": float(_curve(documents, "wall_seconds").sum(1).mean() / 60),
            }
        )
    return rows


def _format(value, digits: int) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def write_summary(rows: list[dict], out: Path) -> None:
    with open(out / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        "| run | seeds | cycles | labeled px/image | % labeled | mIoU, last cycle | mIoU, mean of cycles "
        "| pair distance (px) | unique labels | min/run |"
    )
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for row in rows:
        miou = _format(row["miou"], 3) + ("" if math.isnan(row["miou_std"]) else f" ± {row['miou_std']:.3f}")
        lines.append(
            f"| {row['run']} | {row['seeds']} | {row['cycles']} | {_format(row['labeled_per_image'], 0)} | "
            f"{row['labeled_percent']:.3g} | {miou} | {_format(row['miou_all_cycles'], 3)} | "
            f"{_format(row['pair_distance'], 1)} | "
            f"{_format(row['unique_labels'], 2)} | {_format(row['minutes_per_run'], 1)} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def plot_miou(groups: dict[str, list[dict]], path: Path) -> None:
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    for label, documents in groups.items():
        miou = _curve(documents, "miou")
        if label == SUPERVISED:
            axes.axhline(miou[:, -1].mean(), color="black", linestyle="--", label=f"{label} (100%)")
            continue
        x = _curve(documents, "labeled_percent").mean(0)
        (line,) = axes.plot(
            x, miou.mean(0), marker="o", label=f"{label} ({len(documents)} seed{'s' * (len(documents) > 1)})"
        )
        if len(documents) > 1:
            axes.fill_between(x, miou.min(0), miou.max(0), color=line.get_color(), alpha=0.12)
    axes.set_xlabel("labeled pixels (%)")
    axes.set_ylabel("mIoU (evaluation split)")
    axes.set_title("mean over seeds; band: lowest to highest seed", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def plot_per_class(groups: dict[str, list[dict]], path: Path) -> None:
    classes = next(iter(groups.values()))[0]["classes"]
    figure = Figure(figsize=(9, 4))
    axes = figure.subplots()
    width = 0.8 / len(groups)
    for offset, (label, documents) in enumerate(groups.items()):
        iou = [float(_nanmean(_curve(documents, f"iou_{name}")[:, -1])) for name in classes]
        axes.bar(np.arange(len(classes)) + offset * width - 0.4 + width / 2, iou, width, label=label)
    axes.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("IoU, last cycle")
    axes.legend(fontsize=7, ncol=2)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def plot_diversity(groups: dict[str, list[dict]], path: Path) -> None:
    figure = Figure(figsize=(9, 3.6))
    left, right = figure.subplots(1, 2)
    for label, documents in groups.items():
        if label == SUPERVISED:
            continue
        cycles = _curve(documents, "cycle").mean(0)
        left.plot(cycles, _nanmean(_curve(documents, "pair_distance"), axis=0), marker="o", label=label)
        right.plot(cycles, _nanmean(_curve(documents, "unique_labels"), axis=0), marker="o", label=label)
    left.set_ylabel("mean pair distance of queries (px)")
    right.set_ylabel("mean unique labels queried")
    for axes in (left, right):
        axes.set_xlabel("cycle (1 = random cold start)")
        axes.grid(alpha=0.3)
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def _palette(num_classes: int) -> ListedColormap:
    colors = [colormaps["tab20"](i % 20) for i in range(num_classes)]
    return ListedColormap(colors)


def _rank(values: torch.Tensor) -> np.ndarray:
    """Empirical CDF of a score map in [0, 1]: a display scale that any score's range fits.

    BalEnt spans many orders of magnitude (paper 000 rescales it with a normal CDF for Fig. 2);
    ranking is monotone, so the brightest pixels stay the ones asked first.
    """
    flat = values.reshape(-1).double().cpu()
    ranks = torch.empty_like(flat)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=torch.float64)
    return (ranks / max(1, flat.numel() - 1)).reshape(values.shape).numpy()


def _run_folder(out: Path, groups: dict[str, list[dict]], preferred: list[str]) -> Path | None:
    for label in preferred:
        if label in groups:
            return out / groups[label][0]["run"]
    return None


def uncertainty_figure(out: Path, groups: dict[str, list[dict]], path: Path) -> bool:
    """Paper 000, Fig. 2 on the first evaluation image, from the saved last-cycle models.

    Top: image, ground truth, supervised prediction, active-learning prediction (the pixel
    BalEnt run when there is one). Bottom: BalEnt, PowerBALD, BALD and margin maps, all from
    that active-learning model's MC moments, so they differ only by the score; each is shown
    on its rank scale (bright = asked first; margin shows its deterministic part, a small
    top-1 - top-2 margin, without pMargin's random pool). Returns False when no model exists.
    """
    pixel_runs = sorted(label for label in groups if label.startswith("pixel "))
    active = _run_folder(out, groups, ["pixel balent", *pixel_runs, *groups])
    if active is None or not (active / "model.pt").is_file():
        return False
    config = SimulationConfig.from_dict(read_metrics(active)["config"])
    images, truth, names = load_split(config, config.eval_split, 1)
    model, _ = load_checkpoint(active / "model.pt")
    image = images[0]
    moments = mc_moments(model, image, config.mc_samples, generator=torch.Generator().manual_seed(0))[0]
    top2 = moments.mean.topk(2, dim=0).values  # [2, H, W]
    maps = {
        "BalEnt": score_moments("balent", moments),
        "PowerBALD": score_moments("powerbald", moments, generator=torch.Generator().manual_seed(0)),
        "BALD": score_moments("bald", moments),
        "margin (small = bright)": -(top2[0] - top2[1]),
    }
    predictions = {"active learning: " + active.name: predict_probabilities(model, image)[0].argmax(0)}
    supervised = _run_folder(out, groups, [SUPERVISED])
    if supervised is not None and (supervised / "model.pt").is_file():
        reference, _ = load_checkpoint(supervised / "model.pt")
        predictions = {"supervised": predict_probabilities(reference, image)[0].argmax(0), **predictions}

    classes = {"cmap": _palette(config.num_classes), "vmin": 0, "vmax": config.num_classes - 1}
    shown_truth = np.ma.masked_equal(truth[0].numpy(), IGNORE_INDEX)
    figure = Figure(figsize=(12, 5.2))
    axes = figure.subplots(2, 4)
    top = [("image " + names[0], image.permute(1, 2, 0).numpy(), {})]
    top.append(("ground truth (void blank)", shown_truth, classes))
    for title, prediction in predictions.items():
        top.append((title, prediction.numpy(), classes))
    for axis, (title, picture, style) in zip(axes[0], top):
        axis.imshow(picture, interpolation="nearest", **style)
        axis.set_title(title, fontsize=8)
    for axis, (title, scores) in zip(axes[1], maps.items()):
        axis.imshow(_rank(scores), cmap="gray", interpolation="nearest")
        axis.set_title(title, fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return True


def make_plots(out: str | Path) -> list[Path]:
    """Write every figure and the summary for the runs under `out`; returns the files written."""
    out = Path(out)
    groups = collect_runs(out)
    if not groups:
        raise FileNotFoundError(f"No runs with metrics under {out}: run segal-simulate with --out {out} first.")
    written = []
    rows = summary_rows(groups)
    write_summary(rows, out)
    written += [out / "summary.csv", out / "summary.md"]
    for name, plot in (
        ("miou_vs_labeled.png", plot_miou),
        ("per_class_iou.png", plot_per_class),
        ("diversity.png", plot_diversity),
    ):
        plot(groups, out / name)
        written.append(out / name)
    if uncertainty_figure(out, groups, out / "uncertainty_maps.png"):
        written.append(out / "uncertainty_maps.png")
    return written
