"""Task ranking: does the order of a project's tasks survive another draw of the MC masks, and
does it follow the model's errors?

    ./run.sh bench-ranking [--images 48] [--later-cycle]

Trains the backend's default network the way a project's first cycle does (the train
benchmark's 8 labeled CamVid images, the backend's schedule; scripts/train_benchmark.py), and
with ``--later-cycle`` goes on, warm, for 300 steps with 25 random labeled pixels on 48 more
train images. Then scores CamVid val frames at 480x360 as ``/predict`` does (20 MC samples,
BalEnt at every pixel, the MC product in the backend's precision), twice, with two seeds for
the MC masks, and prints for each definition of a task's value the rank correlation
(Spearman) of the frames' values between the two draws, and between one draw's values and
the frames' pixel error (the MC mean's argmax against CamVid's labels, void left out).

- ``value``: the backend's (``model.calibration.image_value``): the mean BalEnt of the task's pixels.
- ``best-pixels``: the backend's before 2026-12-07: the median BalEntAcq of the 5 best pixels.
- ``mean-entropy``: the mean entropy of the MC mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

from train_benchmark import CAMVID, default_model, labeled_set, val_miou

from backend.config import Settings  # noqa: E402
from backend.trainer import train_config  # noqa: E402
from model.calibration import image_value  # noqa: E402
from model.data import IGNORE_INDEX, SegmentationFolder, random_sparse_labels  # noqa: E402
from model.grid import upsampled_pixel_scores  # noqa: E402
from model.mc_dropout import mc_moments  # noqa: E402
from model.moments import entropy  # noqa: E402
from model.network import upsample_to_image  # noqa: E402
from model.precision import resolve_precision  # noqa: E402
from model.process import prepare_process  # noqa: E402
from model.training import train  # noqa: E402

MC_SEEDS = (11, 22)
DEFINITIONS = ("value", "best-pixels", "mean-entropy")


def trained_model(settings: Settings, later_cycle: bool):
    samples = [(item.image, item.sparse) for item in labeled_set()]
    model = default_model(settings, 0)
    result = train(model, samples, train_config(settings, samples, warm_start=False))
    served = result.teacher or model
    if later_cycle:  # a later cycle: more images, warm from the first
        folder = SegmentationFolder(CAMVID, "train")
        generator = torch.Generator().manual_seed(1)
        for index in np.linspace(0, len(folder) - 1, 48).round().astype(int).tolist():
            image, dense = folder[index]
            samples.append((image, random_sparse_labels(dense, 25, generator)))
        longer = dataclasses.replace(settings, train_steps=300)
        result = train(model, samples, train_config(longer, samples, warm_start=False))
        served = result.teacher or model
    return served.eval(), len(samples), result.steps


def frame_values(model, image: torch.Tensor, seed: int, precision: str) -> tuple[dict[str, float], torch.Tensor]:
    """Each definition's value of one frame ``[3, H, W]`` under MC seed `seed`, and the MC mean ``[C, H, W]``."""
    size = tuple(image.shape[-2:])
    padded = model.padded_size(size)
    generator = torch.Generator().manual_seed(seed)
    coarse = mc_moments(model, image, 20, generator=generator, image_resolution=False, mean_entropy=False,
                        logit_precision=precision)[0]  # fmt: skip
    scores = upsampled_pixel_scores("balent", coarse, size, padded)  # BalEntAcq at every pixel
    mean = upsample_to_image(coarse.mean[None].float(), size, padded)[0]  # [C, H, W]
    values = {
        "value": scores.value(),
        "best-pixels": float(scores.scores.reshape(-1).topk(5).values.median()),
        "mean-entropy": image_value(entropy(mean, dim=0), acquisition="entropy"),
    }
    return values, mean


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="CamVid val frames, evenly spaced (default 48)")
    parser.add_argument("--later-cycle", action="store_true", help="train on 48 more images, 300 steps more")
    args = parser.parse_args(argv)
    prepare_process()
    settings = Settings.from_env({})
    model, labeled_images, steps = trained_model(settings, args.later_cycle)
    precision = resolve_precision(settings.mc_precision, torch.device("cpu"))  # SEGAL_MC_PRECISION
    folder = SegmentationFolder(CAMVID, "val")
    draws = {seed: {name: [] for name in DEFINITIONS} for seed in MC_SEEDS}
    errors = []
    for index in np.linspace(0, len(folder) - 1, args.images).round().astype(int).tolist():
        image, dense = folder[index]
        for seed in MC_SEEDS:
            values, mean = frame_values(model, image, seed, precision)
            for name in DEFINITIONS:
                draws[seed][name].append(values[name])
        known = dense != IGNORE_INDEX
        errors.append(float((mean.argmax(0)[known] != dense[known]).double().mean()))
    print(f"model: {labeled_images} labeled train images, {steps} steps (last run), val mIoU {val_miou(model):.3f}; "
          f"{args.images} CamVid val frames at 480x360, 20 MC samples, MC product {precision}, "
          f"mean pixel error {np.mean(errors):.3f}")  # fmt: skip
    print(f"  {'task value':<14} {'rank corr. between two MC draws':>32} {'rank corr. with the pixel error':>32}")
    first, second = (draws[seed] for seed in MC_SEEDS)
    for name in DEFINITIONS:
        between = spearmanr(first[name], second[name])[0]
        with_error = spearmanr(first[name], errors)[0]
        print(f"  {name:<14} {between:32.2f} {with_error:32.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
