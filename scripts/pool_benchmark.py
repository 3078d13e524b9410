"""Pool scoring against a real Label Studio: throughput, cost per task, memory vs pool size.

    ./run.sh bench-pool [--tasks 200] [--small 50] [--regions] [--procs N]

Starts a Label Studio 1.23.2 on loopback (tests/ls_harness.py), imports real CamVid images
into two projects (`--small` and `--tasks` tasks), and scores each through the backend's pool
job (``backend.pool``: listing, prefetch, MC-dropout proposals, batched pushes, superseding,
the project's model_version) with the default settings and a model with the packaged
ImageNet encoder. Prints, in one run:
- tasks per second and the per-task wall time as a ratio to one plain forward of the same
  model on one 480x360 image (median of several, measured in the same run);
- the peak resident memory of this process during each job (Linux VmHWM, reset before each
  job), which must not grow with the pool.

``--procs N`` scores through the sharded job (``backend.score_job``, N torchrun ranks, as with
``SEGAL_TRAIN_PROCS=N``); its wall time includes starting the ranks, and the peak memory is
this process's plus every rank's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ls_harness import LabelStudioServer, camvid_label_config, import_images  # noqa: E402

from backend.config import Settings  # noqa: E402
from backend.label_config import parse_label_config  # noqa: E402
from backend.service import ActiveLearningBackend  # noqa: E402
from model.grid import GRIDS  # noqa: E402
from model.process import prepare_process  # noqa: E402
from model.network import ModelConfig, build_model  # noqa: E402
from model.regions import warm_up_umap  # noqa: E402

SETTLE_SECONDS = 5
KEYPOINTS_ONLY = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="point" toName="image">{labels}'
    "</KeyPointLabels></View>"
)


def reset_peak_memory() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_forward_times(model, repeats: int = 9) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of single plain forwards (eval, no dropout sampling) of one 480x360 image."""
    image = torch.rand(1, 3, 368, 480)  # 480x360 padded to DeepLabV3+'s multiple of 16
    model.eval()
    times = []
    with torch.inference_mode():
        model(image)
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(image)
            times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


def make_project(ls, client, config: str, images: list[Path], title: str) -> int:
    project = client.projects.create(title=title, label_config=config)
    for start in range(0, len(images), 50):  # several imports: one multipart request stays small
        import_images(ls, project.id, images[start : start + 50])
    return project.id


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def score(backend: ActiveLearningBackend, project: int, config: str, ls_pid: int) -> tuple:
    pid = str(project)
    backend.schemas[pid] = parse_label_config(config)
    reset_peak_memory()
    start, start_ls = time.perf_counter(), process_cpu_seconds(ls_pid)
    start_cpu = time.process_time() + children_cpu_seconds()
    # in this thread, like the forwards it is compared with: torch gives every calling thread
    # its own OpenMP team, and an idle team's spinning would slow the other one down
    state = backend.pool.run(pid, "benchmark")
    # the ranks of a sharded job are waited-for descendants: their CPU time counts as this job's
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() + children_cpu_seconds() - start_cpu
    ls_cpu_seconds = process_cpu_seconds(ls_pid) - start_ls
    if state["status"] != "done":
        raise RuntimeError(f"pool job of project {pid} ended {state['status']}: {state['error']}")
    peak = peak_memory_mib() + sum(rank or 0.0 for rank in state.get("rank_peak_rss_mib", []))
    return state, seconds, cpu_seconds, ls_cpu_seconds, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks of the large pool (default 200)")
    parser.add_argument("--small", type=int, default=50, help="tasks of the small pool (default 50)")
    parser.add_argument("--regions", action="store_true", help="BrushLabels too (superpixel regions per task)")
    parser.add_argument("--procs", type=int, default=1, help="pool job processes (SEGAL_TRAIN_PROCS; default 1)")
    parser.add_argument("--point-grid", choices=GRIDS, help="SEGAL_POINT_GRID (default: the backend's default)")
    parser.add_argument(
        "--camvid", type=Path, default=Path(os.environ.get("CAMVID_DIR", REPO.parent / "shared" / "datasets" / "camvid"))
    )
    args = parser.parse_args(argv)
    prepare_process()  # as the backend's processes do (model/process.py)
    images = sorted((args.camvid / "train").glob("*.png"))
    if len(images) < args.tasks:
        sys.exit(f"need {args.tasks} CamVid train images in {args.camvid}, found {len(images)}")
    from model.data import CAMVID_CLASSES

    labels = "".join(f'<Label value="{name}"/>' for name in CAMVID_CLASSES)
    config = camvid_label_config() if args.regions else KEYPOINTS_ONLY.format(labels=labels)
    with tempfile.TemporaryDirectory(prefix="segal-pool-bench-") as work, LabelStudioServer() as ls:
        client = ls.client()
        warm = make_project(ls, client, config, images[:6], "warm-up")
        small = make_project(ls, client, config, images[: args.small], f"pool of {args.small}")
        large = make_project(ls, client, config, images[: args.tasks], f"pool of {args.tasks}")
        settings = Settings.from_env(
            {
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "MODEL_DIR": str(Path(work) / "models"),
                # no automatic jobs (start-up resume, /setup): the benchmark runs each job itself
                "SEGAL_SCORE_POOL": "off",
                "SEGAL_TRAIN_PROCS": str(args.procs),
                **({"SEGAL_POINT_GRID": args.point_grid} if args.point_grid else {}),
            }
        )
        backend = ActiveLearningBackend(settings)
        model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))
        for project in (warm, small, large):
            backend.store.publish(str(project), model, tuple(CAMVID_CLASSES), extra={})
        ls_pid = ls.process.pid
        # the backend compiles UMAP in a start-up thread (40-60 s of both cores); a pool job after
        # a training run comes long after it, so the timed jobs must not share the cores with it
        waited = time.perf_counter()
        warm_up_umap()  # compiles, or waits for the start-up thread that does
        print(f"waited {time.perf_counter() - waited:.0f} s for the backend's start-up UMAP compilation", flush=True)
        score(backend, warm, config, ls_pid)  # threads, allocator and caches warm
        runs, forwards = [], []
        for tasks, project in ((args.small, small), (args.tasks, large)):
            # the machine is shared: forwards are timed before and after each job, once Label
            # Studio has settled (it updates its counters after an import), and pooled
            time.sleep(SETTLE_SECONDS)
            forwards += plain_forward_times(model)
            runs.append((tasks, *score(backend, project, config, ls_pid)))
            time.sleep(SETTLE_SECONDS)
            forwards += plain_forward_times(model)
        forward = statistics.median(wall for wall, _ in forwards)
        forward_cpu = statistics.median(cpu for _, cpu in forwards)
    kind = "keypoints + brush regions" if args.regions else "keypoints only"
    print(f"pool scoring through Label Studio 1.23.2, {kind}, {settings.mc_samples} MC samples, "
          f"{args.procs} process(es), points scored on the {settings.point_grid} grid, "
          f"torch threads {torch.get_num_threads()} (plain forward)")
    quartiles = statistics.quantiles([wall for wall, _ in forwards], n=4)
    print(f"plain forward, one 480x360 image: median {forward * 1000:.0f} ms wall, {forward_cpu * 1000:.0f} ms CPU "
          f"over {len(forwards)} (wall quartiles {quartiles[0] * 1000:.0f}-{quartiles[2] * 1000:.0f} ms)")
    print("x forward: per task / per plain forward; CPU: this process's CPU time and its ranks' (not Label")
    print("Studio's), which other load on the machine changes less than wall time")
    print(f"{'tasks':>6} {'seconds':>8} {'tasks/s':>8} {'s/task':>7} {'x forward':>9} {'CPU x forward':>13} "
          f"{'LS CPU s/task':>13} {'peak RSS MiB':>12}")
    for tasks, state, seconds, cpu_seconds, ls_cpu_seconds, peak in runs:
        done = max(state["done"], 1)
        print(f"{tasks:>6} {seconds:>8.1f} {done / seconds:>8.2f} {seconds / done:>7.3f} "
              f"{seconds / done / forward:>9.2f} {cpu_seconds / done / forward_cpu:>13.2f} "
              f"{ls_cpu_seconds / done:>13.3f} {peak:>12.0f}")
    for tasks, state, *_ in runs:
        print(f"{tasks:>6} tasks, where the time went: model {state['compute_seconds']:.1f} s, waiting for images "
              f"{state['image_wait_seconds']:.1f} s, waiting for Label Studio's API {state['api_wait_seconds']:.1f} s"
              + (" (summed over the ranks)" if args.procs > 1 else ""))
        if state.get("rank_peak_rss_mib"):
            print(f"{tasks:>6} tasks, peak RSS of each rank (MiB): {state['rank_peak_rss_mib']}")
    small_peak, large_peak = runs[0][-1], runs[1][-1]
    print(f"peak memory, {args.tasks} vs {args.small} tasks: {large_peak / small_peak:.2f}x")


if __name__ == "__main__":
    main()
