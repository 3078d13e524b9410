"""Benchmark: paper 004's region acquisition on 480x360 CamVid frames, on this machine.

    segal-region-benchmark [--data CAMVID_ROOT] [--images 20] [--repeats 5] [--threads N] [--json OUT]

1. Builds a realistic memory bank: the default network (packaged encoder, 11 classes) is
   trained briefly with the contrastive loss on sparse labels of `--images` training frames,
   then the bank is topped up to its full size (11 x 1000 vectors of dim 128) with the
   teacher's embeddings of labeled pixels, picked by the same rule as in training.
2. Fits the region projector (UMAP) on the bank twice in this process: the first fit is what
   the first training run of a server process pays (numba compilation included), the second
   what every later run pays. Then the first ``transform`` (compilation of the search), and
   the load and warm-up of the saved projector in a fresh process (a restarted server).
3. Picks regions for one validation frame, repeated and interleaved: MC moments + embeddings
   (m = 20) from one network pass, SEEDS (cached per image in the backend, timed apart), then
   ``acquire_regions`` (region features, UMAP transform, KMeans, max per cluster), against the
   plain ranking by summed entropy on the same moments. Medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .benchmark import DEFAULT_IMAGE_DIR
from .contrastive import MemoryBank, bank_candidates, pixel_entropy, sample_embeddings
from .data import IGNORE_INDEX, SegmentationFolder, random_sparse_labels
from .mc_dropout import mc_moments, mc_moments_and_embeddings
from .moments import entropy
from .network import ModelConfig, build_model
from .regions import RegionProjector, acquire_regions
from .superpixels import region_sums, seeds_superpixels, to_uint8_rgb, top_regions
from .training import TrainConfig, train

NUM_SAMPLES = 20
REGIONS = 10  # k: regions asked for per image (paper 004's budget per cycle is per dataset; 10 is generous)


@torch.no_grad()
def _top_up(bank: MemoryBank, model, folder: SegmentationFolder, indices: list[int]) -> None:
    """Fill every class queue with the model's embeddings of correctly predicted labeled pixels."""
    model.eval()
    for index in indices:
        image, dense = folder[index]
        features = model.features(image.unsqueeze(0))
        logits = model.logits_from_features(features, tuple(image.shape[-2:]))[0]  # [C, H, W]
        positions = torch.nonzero(dense != IGNORE_INDEX)  # [M, 2]
        labels = dense[positions[:, 0], positions[:, 1]]
        pixel_logits = logits[:, positions[:, 0], positions[:, 1]].t()  # [M, C]
        chosen = bank_candidates(
            labels, pixel_logits.argmax(1), pixel_entropy(pixel_logits), torch.zeros_like(labels), per_image=100
        )
        full = torch.cat([torch.zeros(len(chosen), 1, dtype=torch.int64), positions[chosen]], dim=1)
        vectors = sample_embeddings(model, model.embed(features), tuple(image.shape[-2:]), full)
        for cls in labels[chosen].unique().tolist():
            bank.push(cls, vectors[labels[chosen] == cls])


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 1)


def run(data: Path, images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    train_folder = SegmentationFolder(data, "train")
    generator = torch.Generator().manual_seed(0)
    picks = np.linspace(0, len(train_folder) - 1, images).round().astype(int).tolist()
    samples = [(train_folder[i][0], random_sparse_labels(train_folder[i][1], 200, generator)) for i in picks]
    model = build_model(ModelConfig(num_classes=11))
    start = time.perf_counter()
    result = train(model, samples, TrainConfig(steps=20, batch_size=2, crop_size=(360, 480), teacher_tolerance=None))
    train_seconds = time.perf_counter() - start
    teacher, bank = result.teacher, result.memory_bank
    _top_up(bank, teacher, train_folder, picks)
    vectors = bank.vectors()[0].numpy()

    figures: dict = {"train_seconds_20_steps": round(train_seconds, 1), "bank_vectors": len(vectors)}
    start = time.perf_counter()
    projector = RegionProjector.fit(vectors, seed=0)
    figures["fit_first_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    projector.warm_up()
    figures["first_transform_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    RegionProjector.fit(vectors, seed=1)
    figures["fit_again_seconds"] = round(time.perf_counter() - start, 1)
    with tempfile.TemporaryDirectory() as folder:
        path = projector.save(Path(folder) / "bench.umap")
        figures["projector_file_mib"] = round(path.stat().st_size / 2**20, 1)
        # what a restarted server pays, in its preload thread: a fresh process
        probe = (
            "import sys, time; start = time.perf_counter(); from model.regions import RegionProjector; "
            "RegionProjector.load(sys.argv[1]).warm_up(); print(time.perf_counter() - start)"
        )
        output = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
        figures["fresh_process_load_and_warm_up_seconds"] = round(float(output.stdout.split()[-1]), 1)
        loaded = RegionProjector.load(path)
        loaded.warm_up()

    val_folder = SegmentationFolder(data, "val")
    image = val_folder[0][0]  # [3, 360, 480]
    times: dict[str, list[float]] = {"seeds": [], "mc_plain": [], "mc_with_embeddings": [], "acquire": [], "rank": []}
    for repeat in range(repeats):
        start = time.perf_counter()
        segments = seeds_superpixels(to_uint8_rgb(image), 300)
        times["seeds"].append(time.perf_counter() - start)

        start = time.perf_counter()
        plain = mc_moments(teacher, image, NUM_SAMPLES, generator=torch.Generator().manual_seed(repeat))[0]
        scores = entropy(plain.mean, dim=0)
        top_regions(region_sums(scores, segments), REGIONS, segments)
        times["rank"].append(time.perf_counter() - start)

        start = time.perf_counter()
        moments, embeddings = mc_moments_and_embeddings(
            teacher, image, NUM_SAMPLES, generator=torch.Generator().manual_seed(repeat)
        )
        middle = time.perf_counter()
        chosen, _ = acquire_regions(
            loaded, embeddings, entropy(moments.mean, dim=0), segments, REGIONS, seed=repeat,
            grid_size=teacher.padded_size(tuple(image.shape[-2:])),
        )
        end = time.perf_counter()
        times["mc_with_embeddings"].append(middle - start)
        times["acquire"].append(end - middle)
        assert len(chosen) == REGIONS
        start = time.perf_counter()
        mc_moments(teacher, image, NUM_SAMPLES, generator=torch.Generator().manual_seed(repeat))
        times["mc_plain"].append(time.perf_counter() - start)
    figures.update({f"{name}_ms": _median_ms(values) for name, values in times.items()})
    figures["superpixels"] = int(segments.max()) + 1
    figures["clustered_total_ms"] = round(figures["mc_with_embeddings_ms"] + figures["acquire_ms"], 1)
    figures["clustered_over_ranking"] = round(figures["clustered_total_ms"] / figures["rank_ms"], 2)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time paper 004's region acquisition (UMAP + KMeans).")
    parser.add_argument("--data", default=str(DEFAULT_IMAGE_DIR.parent), help="CamVid root (train/, val/, ...annot/)")
    parser.add_argument("--images", type=int, default=20, help="training frames for the bank")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = run(Path(args.data), args.images, args.repeats)
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
