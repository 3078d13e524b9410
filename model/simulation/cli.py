"""segal-simulate: active-learning simulation on a CamVid-layout dataset, with a ground-truth oracle.

    segal-simulate [--profile quick|medium|paper] [--data DIR] [--out DIR] [--acquisition NAME ...]
                   [--mode pixel|region] [--seed S ...] [--cycles K] [--pixels n] ... (see --help)
    segal-simulate plot OUT        # figures and summary table of every run under OUT

Each (acquisition, seed) is one run in ``OUT/<mode>-<acquisition>-seed<S>/`` (``supervised-seed<S>``
for the full-supervision reference, ``region-<acquisition>-umap-kmeans-seed<S>`` for paper 004's
clustered region selection, ``--mode region --selection umap-kmeans``), holding metrics.csv,
metrics.json, state.npz and the last model.pt. Rerunning a command resumes every run after its
last finished cycle; after the runs, the shared figures and summary.md are (re)written in OUT.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..acquisition import names as acquisition_names
from ..grid import GRIDS
from ..process import prepare_process
from .config import (
    HEAD_CELLS, MODES, PROFILES, SELECTIONS, SUPERVISED, TASK_ORDERS, TRAININGS, SimulationConfig, profile_config,
)
from .loop import ConfigMismatch, run_simulation
from .plots import make_plots

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "camvid"

# (flag, config field, type, help); a flag left out keeps the profile's value.
OVERRIDES = (
    ("--cycles", "cycles", int, "K: active-learning cycles (raise it to extend a finished run)"),
    ("--pixels", "pixels", int, "n: pixels per image, at the cold start and per cycle (pixel mode)"),
    ("--regions", "regions", int, "superpixels per image, at the cold start and per cycle (region mode)"),
    ("--superpixels", "superpixels", int, "SEEDS superpixels asked for per image (region mode)"),
    ("--mc-samples", "mc_samples", int, "m: MC-dropout samples"),
    ("--dropout", "dropout", float, "r: dropout rate before the classifier"),
    ("--scale", "scale", float, "image downscale factor (1 = the files' size)"),
    ("--train-images", "train_images", int, "pool size, evenly spaced over the split (0 = all)"),
    ("--eval-images", "eval_images", int, "evaluation images, evenly spaced (0 = all)"),
    ("--train-split", "train_split", str, "pool split folder"),
    ("--eval-split", "eval_split", str, "evaluation split folder"),
    ("--num-classes", "num_classes", int, "classes (CamVid: 11)"),
    ("--void-index", "void_index", int, "the dataset's void label, ignored (CamVid: 11; -1: none)"),
    ("--steps", "steps", int, "training steps per cycle (wins over --epochs)"),
    ("--supervised-steps", "supervised_steps", int, "training steps of the supervised reference (default: --steps)"),
    ("--epochs", "epochs", int, "training epochs per cycle, used when no --steps is in effect"),
    ("--batch-size", "batch_size", int, "training batch size (>= 2)"),
    ("--lr", "lr", float, "learning rate (encoder: a tenth)"),
    ("--arch", "arch", str, "smp architecture"),
    ("--encoder", "encoder", str, "smp encoder"),
    ("--encoder-weights", "encoder_weights", str, "packaged (offline), imagenet (download) or none"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:1"),
    ("--eval-batch-size", "eval_batch_size", int, "images per inference batch"),
    ("--umap-epochs", "umap_epochs", int, "umap-kmeans: UMAP layout epochs of the region projector (0: UMAP's)"),
    ("--mc-precision", "mc_precision", str, "queries: the MC samples' masked product, fp32 or bf16"),
    ("--tasks-per-cycle", "tasks_per_cycle", int,
     "pixel mode: label only K images (tasks) per cycle, each once, the first K by --task-order"),
)


def _profile_values(field: str) -> str:
    """``quick: 5, paper: 10``: what each profile uses for a setting, for --help."""
    default = SimulationConfig.__dataclass_fields__[field].default
    return ", ".join(f"{name}: {values.get(field, default)}" for name, values in sorted(PROFILES.items(), reverse=True))


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segal-simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="default values (default quick)")
    parser.add_argument("--data", default=os.environ.get("CAMVID_DIR", str(DEFAULT_DATA)), help="CamVid-layout root")
    parser.add_argument("--out", help="output directory (default runs/<profile>)")
    parser.add_argument(
        "--acquisition",
        nargs="+",
        metavar="NAME",
        help=f"one or more of {[*acquisition_names(), SUPERVISED]}, or 'all' (default: balent in pixel "
        "mode, entropy in region mode; with --selection umap-kmeans, 'all' leaves out random)",
    )
    parser.add_argument("--mode", choices=MODES, default="pixel", help="query pixels or superpixels")
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="rank",
        help="region mode: 'rank' takes the top R superpixels by summed score (paper 000's training); "
        "'umap-kmeans' runs paper 004's Algorithm 1: contrastive training with a memory bank and EMA "
        "teacher, UMAP on the bank, KMeans into R clusters, the best region of each (default rank)",
    )
    parser.add_argument(
        "--training",
        choices=TRAININGS,
        help="'contrastive': paper 004's training (projection head, contrastive loss, memory bank, the EMA "
        "teacher evaluated and querying) with any selection, e.g. random regions trained as umap-kmeans "
        "is; 'ce': paper 000's sparse cross-entropy (default: the selection's own)",
    )
    parser.add_argument(
        "--pixel-grid",
        choices=GRIDS,
        help="pixel mode: score queries at every image pixel ('image', on the interpolated moments, the "
        "default) or at the decoder's nodes ('decoder', each tied to its nearest pixel; model.grid)",
    )
    parser.add_argument(
        "--head-cells",
        choices=HEAD_CELLS,
        help="contrastive training: the projection head at the labeled pixels' decoder cells ('labeled', the "
        "default) or on the whole decoder map ('all', as before 2026-12-03)",
    )
    parser.add_argument(
        "--task-order",
        choices=TASK_ORDERS,
        help="with --tasks-per-cycle: 'value' (the backend's task value, the default), 'best-pixels' (the "
        "median of the 5 best pixel scores, the backend's before 2026-12-07), 'mean-entropy', 'random'",
    )
    parser.add_argument("--seed", nargs="+", type=int, default=[0], help="one run per seed (default 0)")
    for flag, field, kind, text in OVERRIDES:
        parser.add_argument(flag, type=kind, help=f"{text} [{_profile_values(field)}]")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop (default: whole image)")
    parser.add_argument("--no-augment", action="store_true", help="no scale/flip/jitter/blur in training")
    parser.add_argument(
        "--warm-start", action=argparse.BooleanOptionalAction,
        help="continue from the previous cycle's weights [medium: on, quick and paper: off]",
    )
    parser.add_argument(
        "--semi", action=argparse.BooleanOptionalAction,
        help="paper 003's semi-supervised training: the EMA teacher's pseudo labels on the unlabeled "
        "pixels, with ClassMix (default off; the supervised reference ignores it)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="skip the shared figures after the runs")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    values = {field: getattr(args, field) for _, field, _, _ in OVERRIDES if getattr(args, field) is not None}
    if args.epochs is not None and args.steps is None:
        values["steps"] = None  # --epochs alone means: train by epochs
    for field in ("train_images", "eval_images"):
        if values.get(field) == 0:
            values[field] = None
    if values.get("void_index") == -1:
        values["void_index"] = None
    if values.get("encoder_weights") == "none":
        values["encoder_weights"] = None
    if args.crop:
        values["crop"] = tuple(args.crop)
    if args.no_augment:
        values["augment"] = False
    for field in ("warm_start", "semi", "training", "pixel_grid", "head_cells", "task_order"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return values


def _acquisitions(requested: list[str] | None, selection: str) -> list[str | None]:
    if not requested:
        return [None]  # the mode's default
    if requested == ["all"]:
        # the clustered selection needs a pixel score: random has none
        return [name for name in (*acquisition_names(), SUPERVISED) if selection == "rank" or name != "random"]
    return requested


def simulate(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    prepare_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / args.profile)
    overrides = _overrides(args)
    try:
        configs = [
            profile_config(
                args.profile,
                args.data,
                mode=args.mode,
                selection=args.selection,
                seed=seed,
                **overrides,
                **({"acquisition": name} if name else {}),
            )
            for seed in args.seed
            for name in _acquisitions(args.acquisition, args.selection)
        ]
        for config in configs:
            run_simulation(config, out, progress=not args.no_progress)
    except FileNotFoundError as error:
        print(f"segal-simulate: {error}\nPass --data DIR (a CamVid-layout folder) or set CAMVID_DIR.", file=sys.stderr)
        return 2
    except (ConfigMismatch, ValueError) as error:
        print(f"segal-simulate: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nsegal-simulate: interrupted. Finished cycles are saved; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    if not args.no_plots:
        for path in make_plots(out):
            print(f"wrote {path}")
    return 0


def plot(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="segal-simulate plot", description="Figures and summary of the runs in OUT.")
    parser.add_argument("out", help="output directory of segal-simulate")
    args = parser.parse_args(argv)
    try:
        for path in make_plots(args.out):
            print(f"wrote {path}")
    except FileNotFoundError as error:
        print(f"segal-simulate plot: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(plot(argv[1:]) if argv[:1] == ["plot"] else simulate(argv))
