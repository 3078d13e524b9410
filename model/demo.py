"""One active-learning cycle on real CamVid images (paper 000, Algorithm 1, one turn).

    segal-demo [--data DIR] [--images 8] [--scale 0.5] [--pixels 5] [--steps 60] [--acquisition balent]

1. cold start: n random labeled pixels per image, revealed from the dense ground truth;
2. train the last-layer-dropout network on those pixels only;
3. MC-dropout inference (m samples) and the acquisition's top-n pixels per image.
It prints the proposed pixels and how often the model is wrong there, next to the same
figure for random pixels: an informative acquisition asks where the model errs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import acquisition
from .acquisition import acquire_pixels
from .data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder, random_sparse_labels
from .mc_dropout import mc_moments
from .network import ModelConfig, build_model
from .training import TrainConfig, train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "camvid"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CAMVID_DIR", str(DEFAULT_DATA)), help="CamVid-layout root")
    parser.add_argument("--images", type=int, default=8, help="training images to use")
    parser.add_argument("--scale", type=float, default=0.5, help="image downscale factor (1 = 480x360)")
    parser.add_argument("--pixels", type=int, default=5, help="n: pixels per image per cycle")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--samples", type=int, default=20, help="m: MC-dropout samples")
    parser.add_argument("--acquisition", default="balent", choices=acquisition.names())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        dataset = SegmentationFolder(args.data, "train", scale=args.scale)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"segal-demo: {error}\nPass --data DIR (a folder with train/ and trainannot/) or set CAMVID_DIR.")
    generator = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(dataset), generator=generator)[: args.images].tolist()
    images, dense, sparse = [], [], []
    for index in picks:
        image, labels = dataset[index]
        images.append(image)
        dense.append(labels)
        sparse.append(random_sparse_labels(labels, args.pixels, generator))
    print(f"{len(images)} CamVid images at {tuple(images[0].shape[-2:])}, {args.pixels} random labeled pixels each")

    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 10 == 0 or step == total:
            print(f"  train step {step}/{total}  loss {loss:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)

    crop = tuple(images[0].shape[-2:])
    result = train(model, list(zip(images, sparse)), TrainConfig(steps=args.steps, crop_size=crop, seed=args.seed), progress)
    model = result.teacher if result.teacher is not None else model  # the EMA teacher, as the backend serves

    proposed_wrong = random_wrong = proposed_total = random_total = 0
    for number, (image, labels, known) in enumerate(zip(images, dense, sparse)):
        moments = mc_moments(model, image, args.samples, generator=generator)[0]
        prediction = moments.mean.argmax(0)
        coords, scores = acquire_pixels(args.acquisition, moments, args.pixels, exclude=known != IGNORE_INDEX, generator=generator)
        print(f"image {dataset.names[picks[number]]}: {args.acquisition} asks for")
        for (row, col), value in zip(coords.tolist(), scores.tolist()):
            truth = int(labels[row, col])
            guess = CAMVID_CLASSES[int(prediction[row, col])]
            truth_name = CAMVID_CLASSES[truth] if truth != IGNORE_INDEX else "void"
            print(f"  ({row:3d}, {col:3d})  score {value:10.4g}  predicted {guess:<10}  truth {truth_name}")
            if truth != IGNORE_INDEX:
                proposed_total += 1
                proposed_wrong += int(prediction[row, col]) != truth
        control = random_sparse_labels(labels, 200, generator) != IGNORE_INDEX
        random_total += int(control.sum())
        random_wrong += int((prediction[control] != labels[control]).sum())
    print(
        f"model wrong at {proposed_wrong}/{proposed_total} proposed pixels "
        f"({100 * proposed_wrong / max(1, proposed_total):.0f}%) vs {100 * random_wrong / max(1, random_total):.0f}% "
        "of random pixels"
    )


if __name__ == "__main__":
    main()
