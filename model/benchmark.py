"""Benchmark: MC-dropout inference and BalEnt scoring on one 480x360 image, on this machine.

    segal-benchmark [--image PATH] [--repeats 7] [--threads N] [--json OUT]

Prints, for the default network (DeepLabV3+, tf_efficientnet_lite0, 11 classes):
- MC inference with m = 20 over one plain forward (goal <= 1.3x),
- BalEnt scoring over plain entropy on the same moments (goal <= 2x),
- the peak memory each kind of inference adds to the process (Linux),
- the plain forward and the MC moments with glibc's malloc defaults against ``model.malloc``'s
  thresholds (fresh processes, alternated; Linux with glibc).
Ratios are taken from interleaved runs in one process (medians), since the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .process import prepare_process

DEFAULT_IMAGE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "camvid" / "val"
NUM_CLASSES = 11
NUM_SAMPLES = 20


def _find_image(path: str | None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get("CAMVID_DIR")
    folder = Path(env) / "val" if env else DEFAULT_IMAGE_DIR
    images = sorted(folder.glob("*.png"))
    if not images:
        raise SystemExit(f"No image found in {folder}; pass --image PATH (a 480x360 RGB image) or set CAMVID_DIR.")
    return images[0]


def _timings(functions: dict, repeats: int) -> dict[str, list[float]]:
    """Interleave the functions `repeats` times; seconds of every run of each."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _torch_special_balent(moments) -> torch.Tensor:
    """BalEnt with torch's lgamma/digamma, for comparison only (no edge-case handling)."""
    mean = moments.mean.clamp(1e-12, 1 - 1e-12)
    bound = mean * (1 - mean)
    var = moments.variance.clamp(bound * 1e-15, bound * (1 - 1e-6))
    common = bound / var - 1
    a, b = mean * common + 1, (1 - mean) * common
    h = (
        torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        - (a - 1) * torch.digamma(a) - (b - 1) * torch.digamma(b) + (a + b - 2) * torch.digamma(a + b)
    )
    shannon = -(mean * mean.log()).sum(0)
    return ((mean * h).sum(0) + shannon) / (shannon + math.log(2))


def _load(image_path: Path):
    from .data import load_image
    from .network import ModelConfig, build_model

    model = build_model(ModelConfig(num_classes=NUM_CLASSES)).eval()
    image = load_image(image_path).unsqueeze(0)  # [1, 3, H, W]
    return model, image


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _memory_probe(kind: str, image_path: str) -> None:
    """Run one kind of inference in this (fresh) process; print the peak RSS it added, in MiB.

    Linux resets the peak (VmHWM) when "5" is written to /proc/self/clear_refs, so the peak
    is measured from just before the call, after the model is loaded.
    """
    from .mc_dropout import mc_moments, mc_samples

    model, image = _load(Path(image_path))
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_mib("VmRSS")
    with torch.no_grad():
        if kind == "plain":
            model(image)
        elif kind == "mc_streamed":
            mc_moments(model, image, NUM_SAMPLES, generator=torch.Generator().manual_seed(0))
        elif kind == "mc_stored_full_res":
            # the O(m C H W) way: keep every sample at the image resolution
            samples = mc_samples(model, image[0], NUM_SAMPLES, generator=torch.Generator().manual_seed(0))
            model.upsample(samples, tuple(image.shape[-2:])).double()
    print(_proc_status_mib("VmHWM") - before)


def _fresh_process(args: list[str], **env: str) -> str:
    """The last line this benchmark prints when run with `args` in a fresh process (same threads)."""
    out = subprocess.run(
        [sys.executable, "-m", "model.benchmark", *args], capture_output=True, text=True, check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **env},
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def _peak_memory(image_path: Path) -> dict[str, float]:
    return {
        kind: float(_fresh_process(["--memory-probe", kind, "--image", str(image_path)]))
        for kind in ("plain", "mc_streamed", "mc_stored_full_res")
    }


def _inference_calls(model, image: torch.Tensor) -> dict:
    """The two timed calls on ``image [1, 3, H, W]``: a plain forward and the MC moments (returned)."""
    from .mc_dropout import mc_moments

    generator = torch.Generator().manual_seed(0)

    def plain():
        with torch.no_grad():
            model(image)

    def mc():
        return mc_moments(model, image, NUM_SAMPLES, generator=generator)[0]

    return {"plain_forward": plain, "mc_dropout_m20": mc}


def _malloc_probe(image_path: str, repeats: int) -> None:
    """In a fresh process (SEGAL_MALLOC set by the caller): print the medians of a plain forward
    and of the MC moments, and the peak memory they add, as JSON."""
    calls = _inference_calls(*_load(Path(image_path)))
    for call in calls.values():  # first calls: oneDNN primitives
        call()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_mib("VmRSS")
    runs = _timings(calls, repeats)
    figures = {name: statistics.median(values) for name, values in runs.items()}
    print(json.dumps({**figures, "peak_added_mib": _proc_status_mib("VmHWM") - before}))


def _malloc_comparison(image_path: Path, repeats: int, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Medians over `rounds` alternated fresh processes with glibc's defaults and with
    ``keep_freed_memory`` (each process: `repeats` interleaved runs)."""
    results: dict[str, list[dict]] = {"default": [], "keep": []}
    args = ["--malloc-probe", "--repeats", str(repeats), "--image", str(image_path)]
    for _ in range(rounds):
        for choice in results:
            results[choice].append(json.loads(_fresh_process(args, SEGAL_MALLOC=choice)))
    return {
        choice: {key: statistics.median(row[key] for row in rows) for key in rows[0]} for choice, rows in results.items()
    }


def run(image_path: Path, repeats: int) -> dict:
    from .acquisition import score_moments

    model, image = _load(image_path)
    height, width = image.shape[-2:]
    calls = _inference_calls(model, image)
    moments = calls["mc_dropout_m20"]()
    for name in ("balent", "entropy"):  # warm-up: numba compiles (or loads its cache) once
        score_moments(name, moments)
    inference = _timings(calls, repeats)
    scoring = _timings(
        {
            "entropy": lambda: score_moments("entropy", moments),
            "balent": lambda: score_moments("balent", moments),
            "balent_torch_special": lambda: _torch_special_balent(moments),
        },
        repeats,
    )
    runs = {**inference, **{f"score_{k}": v for k, v in scoring.items()}}
    seconds = {name: statistics.median(values) for name, values in runs.items()}
    fastest = {name: min(values) for name, values in runs.items()}
    pairs = {
        "mc_m20_over_plain_forward": ("mc_dropout_m20", "plain_forward"),
        "balent_over_entropy": ("score_balent", "score_entropy"),
        "torch_special_balent_over_entropy": ("score_balent_torch_special", "score_entropy"),
    }
    return {
        "image": str(image_path),
        "size": f"{width}x{height}",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "seconds": seconds,
        "ratios": {key: seconds[a] / seconds[b] for key, (a, b) in pairs.items()},
        "ratios_of_fastest_runs": {key: fastest[a] / fastest[b] for key, (a, b) in pairs.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="RGB image to use (default: the first CamVid val image)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--no-malloc", action="store_true", help="skip the glibc malloc comparison")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--malloc-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    prepare_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    image_path = _find_image(args.image)
    if args.memory_probe:
        _memory_probe(args.memory_probe, str(image_path))
        return
    if args.malloc_probe:
        _malloc_probe(str(image_path), args.repeats)
        return
    print(f"image {image_path}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    result = run(image_path, args.repeats)
    if not args.no_memory:
        result["peak_added_mib"] = _peak_memory(image_path)
    if not args.no_malloc and Path("/proc/self/clear_refs").exists():
        result["malloc"] = _malloc_comparison(image_path, args.repeats)
    seconds, ratios, best = result["seconds"], result["ratios"], result["ratios_of_fastest_runs"]
    print(f"\n| measure ({result['size']}, median of {args.repeats}) | value | ratio of the fastest runs |")
    print("|---|---|---|")
    print(f"| plain forward | {seconds['plain_forward'] * 1e3:.0f} ms | |")
    print(f"| MC dropout, m = 20 (streamed moments, image resolution) | {seconds['mc_dropout_m20'] * 1e3:.0f} ms | |")
    print(
        f"| **MC m = 20 / plain forward** (goal <= 1.3) | **{ratios['mc_m20_over_plain_forward']:.2f}x** "
        f"| {best['mc_m20_over_plain_forward']:.2f}x |"
    )
    print(f"| entropy score | {seconds['score_entropy'] * 1e3:.1f} ms | |")
    print(f"| BalEntAcq score (fused numba kernel) | {seconds['score_balent'] * 1e3:.1f} ms | |")
    print(
        f"| **BalEnt / entropy** (goal <= 2) | **{ratios['balent_over_entropy']:.2f}x** "
        f"| {best['balent_over_entropy']:.2f}x |"
    )
    print(
        f"| BalEnt with torch lgamma/digamma / entropy (for comparison) "
        f"| {ratios['torch_special_balent_over_entropy']:.2f}x | {best['torch_special_balent_over_entropy']:.2f}x |"
    )
    for kind, mib in result.get("peak_added_mib", {}).items():
        print(f"| peak memory added by {kind} | {mib:.0f} MiB | |")
    if "malloc" in result:
        default, keep = result["malloc"]["default"], result["malloc"]["keep"]
        print("\n| fresh processes, 3 alternated rounds | glibc defaults | kept freed memory (model/process.py) | ratio |")
        print("|---|---|---|---|")
        for key, label in (("plain_forward", "plain forward"), ("mc_dropout_m20", "MC dropout, m = 20")):
            print(f"| {label} | {default[key] * 1e3:.0f} ms | {keep[key] * 1e3:.0f} ms | {keep[key] / default[key]:.2f}x |")
        print(f"| peak memory added after the first calls | {default['peak_added_mib']:.0f} MiB "
              f"| {keep['peak_added_mib']:.0f} MiB (their memory stays resident) | |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
