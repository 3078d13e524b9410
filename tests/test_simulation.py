"""The active-learning simulation end to end on real CamVid (tiny: 6 + 4 frames at 60x45).

Checks the metrics on hand-built inputs, then whole runs: exact label growth, no query
asked twice, the metrics files, resuming after an interruption (bit-identical to an
uninterrupted run), refusing a changed config, region mode, and the figures.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from model.data import CAMVID_CLASSES, IGNORE_INDEX
from model.simulation import ConfigMismatch, profile_config, run_simulation
from model.simulation.cli import simulate
from model.simulation.metrics import class_iou, confusion_matrix, diversity, mean_iou
from model.simulation.plots import make_plots
from model.simulation.report import METRIC_COLUMNS
from model.simulation.splits import load_split
from model.simulation.state import load_state

TINY = {"scale": 0.125, "train_images": 6, "eval_images": 4, "steps": 3, "mc_samples": 4}
TINY_FLAGS = ["--scale", "0.125", "--train-images", "6", "--eval-images", "4", "--steps", "3", "--mc-samples", "4"]
N = 5  # pixels per image per cycle (the profile's n)
IMAGES = 6


def tiny(camvid_dir, **overrides):
    return profile_config("quick", camvid_dir, **{**TINY, **overrides})


def test_iou_from_a_hand_built_confusion_matrix():
    confusion = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])  # rows truth, columns prediction
    iou = class_iou(confusion)
    assert iou[0] == pytest.approx(3 / 6)  # TP 3, FP 2, FN 1
    assert iou[1] == pytest.approx(4 / 7)  # TP 4, FP 1, FN 2
    assert math.isnan(iou[2])  # in neither truth nor prediction: no IoU, not a zero
    assert mean_iou(confusion) == pytest.approx((3 / 6 + 4 / 7) / 2)
    truth = torch.tensor([[0, 0, 1], [IGNORE_INDEX, 1, 2]])
    prediction = torch.tensor([[0, 1, 1], [2, 1, 0]])
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])  # the void pixel (predicted 2) is not counted
    assert np.array_equal(confusion_matrix(truth, prediction, 3), expected)


def test_diversity_on_hand_built_queries():
    one = (np.array([[0, 0], [0, 3], [4, 0]]), np.array([1, 1, 2]))  # distances 3, 4, 5; labels {1, 2}
    two = (np.array([[10, 10], [13, 14]]), np.array([5, IGNORE_INDEX]))  # distance 5; void not a label
    lone = (np.array([[7, 7]]), np.array([3]))  # one point: no pair distance, one label
    distance, unique = diversity([one, two, lone])
    assert distance == pytest.approx((4 + 5) / 2)
    assert unique == pytest.approx((2 + 1 + 1) / 3)
    assert all(math.isnan(v) for v in diversity([]))


@pytest.fixture(scope="module")
def resumed(camvid_dir, tmp_path_factory):
    """A 2-cycle balent run interrupted after cycle 1, and the same run without interruption."""
    out = tmp_path_factory.mktemp("resumed")
    first = run_simulation(tiny(camvid_dir, cycles=1), out, progress=False, log=lambda _: None)
    first_rows = [dict(row) for row in first.rows]
    second = run_simulation(tiny(camvid_dir, cycles=2), out, progress=False, log=lambda _: None)
    straight_out = tmp_path_factory.mktemp("straight")
    straight = run_simulation(tiny(camvid_dir, cycles=2), straight_out, progress=False, log=lambda _: None)
    return out, first, first_rows, second, straight


def test_labels_grow_by_exactly_n_per_image_and_never_repeat(resumed):
    _, _, _, second, _ = resumed
    assert [row["labeled_pixels"] for row in second.rows] == [N * IMAGES, 2 * N * IMAGES]
    assert [row["queried_per_image"] for row in second.rows] == [N, N]
    state = load_state(second.folder)
    assert state.completed == 2
    for revealed_at in state.revealed_at:
        # cycles 1 and 2 trained on 5 + 5 pixels; the 5 queried by cycle 2 wait for cycle 3.
        # One value per pixel: a pixel asked for twice would leave a cycle with fewer than n.
        assert [int((revealed_at == cycle).sum()) for cycle in (1, 2, 3)] == [N, N, N]
        assert int((revealed_at > 0).sum()) == 3 * N


def test_queried_pixels_are_never_void(resumed, camvid_dir):
    _, _, _, second, _ = resumed
    _, truth, _ = load_split(tiny(camvid_dir), "train", IMAGES)
    for labels, revealed_at in zip(truth, load_state(second.folder).revealed_at):
        assert (labels.numpy()[revealed_at > 0] != IGNORE_INDEX).all()


def test_metrics_files_have_the_documented_columns(resumed):
    _, _, _, second, _ = resumed
    with open(second.folder / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    header = list(rows[0])
    assert header[: len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    assert header[len(METRIC_COLUMNS) :] == [f"iou_{name}" for name in CAMVID_CLASSES]
    assert [int(row["cycle"]) for row in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= float(row["miou"]) <= 1.0
        assert float(row["pair_distance"]) > 0 and 1 <= float(row["unique_labels"]) <= N
    assert (second.folder / "metrics.json").is_file() and (second.folder / "state.npz").is_file()


def test_resume_continues_instead_of_restarting(resumed, camvid_dir):
    out, first, first_rows, second, straight = resumed
    assert first.computed == [1] and second.computed == [2]
    assert second.rows[0] == first_rows[0]  # cycle 1 untouched: same figures, wall time and timestamp
    # and exactly what an uninterrupted run gives
    assert [row["miou"] for row in second.rows] == [row["miou"] for row in straight.rows]
    for a, b in zip(load_state(second.folder).revealed_at, load_state(straight.folder).revealed_at):
        assert np.array_equal(a, b)
    again = run_simulation(tiny(camvid_dir, cycles=2), out, progress=False, log=lambda _: None)
    assert again.computed == [] and again.rows == second.rows  # nothing left to do


def test_a_changed_config_refuses_to_resume(resumed, camvid_dir, capsys):
    out, *_ = resumed
    with pytest.raises(ConfigMismatch, match=r"pixels: 5 -> 3"):
        run_simulation(tiny(camvid_dir, cycles=2, pixels=3), out, progress=False)
    code = simulate(["--data", str(camvid_dir), "--out", str(out), *TINY_FLAGS, "--lr", "0.001", "--no-plots"])
    assert code == 2
    assert "Refusing to resume" in capsys.readouterr().err


def test_region_mode_reveals_whole_superpixels(camvid_dir, tmp_path):
    config = tiny(camvid_dir, mode="region", acquisition="entropy", cycles=2, regions=2, superpixels=30)
    result = run_simulation(config, tmp_path, progress=False, log=lambda _: None)
    state = load_state(result.folder)
    assert state.segments is not None
    for revealed_at, segments in zip(state.revealed_at, state.segments):
        for cycle in (1, 2, 3):
            regions = np.unique(segments[revealed_at == cycle])
            assert len(regions) == 2  # R regions per image per cycle
            for region in regions:  # a region is revealed whole, once
                assert (revealed_at[segments == region] == cycle).all()
    labeled = [row["labeled_pixels"] for row in result.rows]
    assert 0 < labeled[0] < labeled[1]
    assert all(0.0 <= row["miou"] <= 1.0 for row in result.rows)


def test_plots_compare_the_runs_of_an_output_directory(resumed, camvid_dir):
    out, *_ = resumed
    assert (
        simulate(
            [
                "--data",
                str(camvid_dir),
                "--out",
                str(out),
                *TINY_FLAGS,
                "--cycles",
                "1",
                "--acquisition",
                "random",
                "supervised",
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    written = make_plots(out)
    names = {path.name for path in written}
    assert {"miou_vs_labeled.png", "per_class_iou.png", "diversity.png", "uncertainty_maps.png"} <= names
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "pixel balent" in summary and "pixel random" in summary and "supervised" in summary


def test_balent_queries_keep_the_torch_thread_count(camvid_dir, tmp_path):
    """numba's OpenMP layer would reset torch's thread count to every core (see loop._torch_threads_kept)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(tiny(camvid_dir, cycles=1), tmp_path, progress=False, log=lambda _: None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
