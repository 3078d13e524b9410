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


CLUSTERED = {"mode": "region", "acquisition": "entropy", "selection": "umap-kmeans", "regions": 2, "superpixels": 100}
R = CLUSTERED["regions"]


def _assert_r_new_whole_regions_per_cycle(state, cycles):
    for revealed_at, segments in zip(state.revealed_at, state.segments):
        for cycle in cycles:
            regions = np.unique(segments[revealed_at == cycle])
            assert len(regions) == R  # exactly R new regions per image per cycle
            for region in regions:  # whole, and once: never a region revealed before
                assert (revealed_at[segments == region] == cycle).all()


@pytest.fixture(scope="module")
def clustered(camvid_dir, tmp_path_factory):
    """Paper 004's Algorithm 1, 2 cycles; and a warm-started one, interrupted after cycle 1 and not.

    The first UMAP fit of the process compiles numba code (~40 s here); later fits take a second.
    """
    quiet = {"progress": False, "log": lambda _: None}
    run = run_simulation(tiny(camvid_dir, cycles=2, **CLUSTERED), tmp_path_factory.mktemp("clustered"), **quiet)
    out = tmp_path_factory.mktemp("clustered-warm")
    run_simulation(tiny(camvid_dir, cycles=1, warm_start=True, **CLUSTERED), out, **quiet)
    resumed = run_simulation(tiny(camvid_dir, cycles=2, warm_start=True, **CLUSTERED), out, **quiet)
    straight_out = tmp_path_factory.mktemp("clustered-straight")
    straight = run_simulation(tiny(camvid_dir, cycles=2, warm_start=True, **CLUSTERED), straight_out, **quiet)
    return run, resumed, straight


def test_umap_kmeans_runs_paper_004_and_reveals_r_new_regions_per_cycle(clustered):
    from model.checkpoint import load_checkpoint
    from model.regions import MIN_FIT_VECTORS

    run, resumed, straight = clustered
    assert "umap-kmeans" in run.folder.name and run.folder.name == "region-entropy-umap-kmeans-seed0"
    state = load_state(run.folder)
    assert state.config["selection"] == "umap-kmeans"
    _assert_r_new_whole_regions_per_cycle(state, (1, 2, 3))  # cold start, then the clustered queries
    assert all(segments.max() + 1 > 3 * R for segments in state.segments)  # KMeans had more candidates than R
    for row in run.rows:
        # every cycle fitted UMAP on its bank, so its queries were the clustered ones, not the fallback
        assert row["projector_vectors"] >= MIN_FIT_VECTORS
        assert row["projector_seconds"] > 0 and row["acquire_seconds"] > 0
        assert 0.0 <= row["miou"] <= 1.0
    with open(run.folder / "metrics.csv") as file:
        header = next(csv.reader(file))
    assert header[: len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    assert {"projector_vectors", "projector_seconds"} <= set(header)
    # the evaluated model (the EMA teacher, with the projection head) is saved with its memory bank
    model, meta = load_checkpoint(run.folder / "model.pt")
    assert model.config.projection_dim == 128
    assert meta["memory_bank"] is not None and len(meta["memory_bank"]) == run.rows[-1]["projector_vectors"]
    # warm start: the resumed run continues the saved teacher and bank exactly as an uninterrupted one
    _assert_r_new_whole_regions_per_cycle(load_state(resumed.folder), (1, 2, 3))
    assert [row["miou"] for row in resumed.rows] == [row["miou"] for row in straight.rows]
    assert [row["projector_vectors"] for row in resumed.rows] == [row["projector_vectors"] for row in straight.rows]
    for a, b in zip(load_state(resumed.folder).revealed_at, load_state(straight.folder).revealed_at):
        assert np.array_equal(a, b)


def test_umap_kmeans_falls_back_to_rank_when_the_bank_is_too_small(camvid_dir, tmp_path, monkeypatch):
    from model.simulation import loop

    monkeypatch.setattr(loop, "MIN_FIT_VECTORS", 10**9)  # no bank is large enough
    messages = []
    result = run_simulation(tiny(camvid_dir, cycles=1, **CLUSTERED), tmp_path, progress=False, log=messages.append)
    assert result.rows[0]["projector_vectors"] == 0  # recorded: no projector, ranked by summed entropy
    assert any("ranked by summed score instead" in message for message in messages)
    _assert_r_new_whole_regions_per_cycle(load_state(result.folder), (1, 2))


def test_selection_config_errors_and_old_runs_without_it(camvid_dir, tmp_path, capsys):
    from model.simulation.config import differences
    from model.simulation.plots import run_label

    with pytest.raises(ValueError, match="mode 'region'"):
        tiny(camvid_dir, mode="pixel", acquisition="entropy", selection="umap-kmeans")
    with pytest.raises(ValueError, match="'random' has no score"):
        tiny(camvid_dir, mode="region", acquisition="random", selection="umap-kmeans")
    with pytest.raises(ValueError, match="selection must be one of"):
        tiny(camvid_dir, mode="region", selection="kmeans")
    # a run saved before the field existed resumes as rank, with its old folder name
    rank = tiny(camvid_dir, **{**CLUSTERED, "selection": "rank"})
    old = {key: value for key, value in rank.to_dict().items() if key != "selection"}
    assert differences(old, rank) == []
    assert rank.run_name == "region-entropy-seed0"
    assert differences(old, tiny(camvid_dir, **CLUSTERED)) == ["selection: 'rank' -> 'umap-kmeans'"]
    # the supervised reference never queries: the selection does not apply to it
    assert not tiny(camvid_dir, acquisition="supervised", selection="umap-kmeans").clustered
    # the figures keep umap-kmeans runs apart from the rank runs of the same acquisition
    assert run_label(old) == "region entropy"
    assert run_label(tiny(camvid_dir, **CLUSTERED).to_dict()) == "region entropy umap-kmeans"
    # the command line refuses before running anything
    flags = ["--data", str(camvid_dir), "--out", str(tmp_path), *TINY_FLAGS, "--no-plots", "--selection", "umap-kmeans"]
    assert simulate([*flags, "--mode", "pixel", "--acquisition", "entropy"]) == 2
    assert simulate([*flags, "--mode", "region", "--acquisition", "random"]) == 2
    assert "'random' has no score" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _record_training(monkeypatch):
    """Record every cycle's TrainConfig and the trained EMA teacher's weights (two lists)."""
    from model.simulation import loop

    configs, teachers = [], []
    real_train = loop.train

    def recording_train(model, samples, config, *args, **kwargs):
        configs.append(config)
        result = real_train(model, samples, config, *args, **kwargs)
        teachers.append({name: value.clone() for name, value in result.teacher.state_dict().items()})
        return result

    monkeypatch.setattr(loop, "train", recording_train)
    return configs, teachers


def test_pixel_queries_on_the_decoder_grid_ask_node_pixels(camvid_dir, tmp_path):
    from model.simulation.config import differences
    from model.simulation.plots import run_label

    config = tiny(camvid_dir, cycles=2, pixel_grid="decoder")
    result = run_simulation(config, tmp_path, progress=False, log=lambda _: None)
    assert result.folder.name == "pixel-balent-decoder-seed0"
    state = load_state(result.folder)
    for revealed_at in state.revealed_at:
        for cycle in (2, 3):  # the queries (cycle 1 is the random cold start)
            rows, cols = np.nonzero(revealed_at == cycle)
            assert len(rows) == N
            # DeepLabV3+'s decoder is at 1/4: node i stands for pixel 4i + 2
            assert (rows % 4 == 2).all() and (cols % 4 == 2).all()
    assert run_label(config.to_dict()) == "pixel balent decoder"
    plain = tiny(camvid_dir)
    old = {key: value for key, value in plain.to_dict().items() if key != "pixel_grid"}
    assert differences(old, plain) == [] and plain.run_name == "pixel-balent-seed0"
    assert differences(old, config) == ["pixel_grid: 'image' -> 'decoder'"]
    with pytest.raises(ValueError, match="applies to pixel queries"):
        tiny(camvid_dir, mode="region", pixel_grid="decoder")


def test_the_mc_precision_reaches_every_query(camvid_dir, tmp_path, monkeypatch):
    """``mc_precision="bf16"``: the queries' MC samples take the backend's bf16 product (its own
    run name; older runs read as fp32); a CPU without native bf16 refuses it with the reason."""
    from model.precision import bf16_is_native
    from model.simulation import loop
    from model.simulation.config import differences

    asked = []
    real_mc_moments = loop.mc_moments

    def recording_mc_moments(*args, **kwargs):
        asked.append(kwargs.get("logit_precision"))
        return real_mc_moments(*args, **kwargs)

    monkeypatch.setattr(loop, "mc_moments", recording_mc_moments)
    config = tiny(camvid_dir, cycles=2, mc_precision="bf16")
    plain = tiny(camvid_dir)
    old = {key: value for key, value in plain.to_dict().items() if key != "mc_precision"}
    assert differences(old, plain) == [] and plain.run_name == "pixel-balent-seed0"
    assert differences(old, config) == ["mc_precision: 'fp32' -> 'bf16'"]
    with pytest.raises(ValueError, match="mc_precision must be fp32 or bf16"):
        tiny(camvid_dir, mc_precision="fp16")
    if not bf16_is_native(torch.device("cpu")):
        with pytest.raises(ValueError, match="native bf16"):
            run_simulation(config, tmp_path, progress=False, log=lambda _: None)
        return
    result = run_simulation(config, tmp_path, progress=False, log=lambda _: None)
    assert result.folder.name == "pixel-balent-mcbf16-seed0"
    assert asked and set(asked) == {"bf16"}  # cycle 2's queries (cycle 1 is the random cold start)
    state = load_state(result.folder)
    assert all((revealed_at == 2).sum() == N for revealed_at in state.revealed_at)


def test_random_regions_can_train_as_umap_kmeans_does(camvid_dir, tmp_path, monkeypatch, capsys):
    """``training="contrastive"``: a rank run trained and served paper 004's way, so that it differs
    from umap-kmeans by the selection alone."""
    from model.checkpoint import load_checkpoint
    from model.simulation.config import differences
    from model.simulation.plots import run_label

    configs, teachers = _record_training(monkeypatch)
    regions = {**CLUSTERED, "acquisition": "random", "selection": "rank"}
    config = tiny(camvid_dir, cycles=2, training="contrastive", **regions)
    result = run_simulation(config, tmp_path, progress=False, log=lambda _: None)
    assert result.folder.name == "region-random-contrastive-seed0"
    assert [(c.contrastive_weight > 0, c.ema_decay is not None) for c in configs] == [(True, True)] * 2
    _assert_r_new_whole_regions_per_cycle(load_state(result.folder), (1, 2, 3))
    assert all(row["projector_vectors"] == 0 for row in result.rows)  # rank: no UMAP
    # the EMA teacher (with the projection head) is the model evaluated and saved, with its bank
    model, meta = load_checkpoint(result.folder / "model.pt")
    assert model.config.projection_dim == 128 and meta["memory_bank"] is not None
    assert all(torch.equal(model.state_dict()[name], value) for name, value in teachers[-1].items())
    # a plain rank run is unchanged by the option: no head, no teacher, the same folder and label
    plain = tiny(camvid_dir, **regions)
    assert not (plain.contrastive or plain.teacher) and plain.run_name == "region-random-seed0"
    old = {key: value for key, value in plain.to_dict().items() if key != "training"}
    assert differences(old, plain) == [] and run_label(old) == "region random"
    assert differences(old, config) == ["training: None -> 'contrastive'"]
    assert run_label(config.to_dict()) == "region random contrastive"
    assert tiny(camvid_dir, **CLUSTERED).contrastive  # umap-kmeans trains paper 004's way by default
    assert not tiny(camvid_dir, acquisition="supervised", training="contrastive").contrastive
    with pytest.raises(ValueError, match="needs paper 004's training"):
        tiny(camvid_dir, training="ce", **CLUSTERED)
    with pytest.raises(ValueError, match="training must be one of"):
        tiny(camvid_dir, training="infonce")
    flags = ["--data", str(camvid_dir), "--out", str(tmp_path / "cli"), *TINY_FLAGS, "--no-plots"]
    assert simulate([*flags, "--mode", "region", "--selection", "umap-kmeans", "--training", "ce"]) == 2
    assert "needs paper 004's training" in capsys.readouterr().err


def test_semi_supervised_runs_train_the_teacher_on_pseudo_labels(camvid_dir, tmp_path, monkeypatch):
    from model.checkpoint import load_checkpoint
    from model.simulation.config import PROFILES, differences
    from model.simulation.plots import run_label

    configs, teachers = _record_training(monkeypatch)
    config = tiny(camvid_dir, cycles=2, semi=True, warm_start=True)
    result = run_simulation(config, tmp_path, progress=False, log=lambda _: None)
    assert result.folder.name == "pixel-balent-semi-seed0"
    assert [config.semi_supervised and config.ema_decay is not None for config in configs] == [True, True]
    state = load_state(result.folder)
    assert all(int((revealed > 0).sum()) == 3 * N for revealed in state.revealed_at)  # cold start + 2 queries
    model, _ = load_checkpoint(result.folder / "model.pt")
    saved = model.state_dict()
    # the student is evaluated and saved; the teacher only gave the pseudo labels
    assert not all(torch.equal(saved[name], value) for name, value in teachers[-1].items())
    assert config.teacher and not config.serves_teacher
    assert all(0.0 <= row["miou"] <= 1.0 for row in result.rows)
    # the figures keep semi runs apart; runs saved before the option resume as supervised-only runs
    assert run_label(config.to_dict()) == "pixel balent semi"
    reference = tiny(camvid_dir, acquisition="supervised", semi=True)
    plain = tiny(camvid_dir)
    old = {key: value for key, value in plain.to_dict().items() if key != "semi"}
    assert differences(old, plain) == [] and plain.run_name == "pixel-balent-seed0"
    assert differences(old, tiny(camvid_dir, semi=True)) == ["semi: False -> True"]
    # the supervised reference has dense labels: semi does not apply, and its own steps do not touch AL runs
    assert not (reference.semi_supervised or reference.teacher or reference.serves_teacher)
    assert reference.run_name == "supervised-seed0"
    assert differences(plain.to_dict(), tiny(camvid_dir, supervised_steps=7)) == []
    # the medium profile stays at the quick profile's labeled share (0.23%) with warm-started cycles
    medium = profile_config("medium", camvid_dir)
    frame = (360 * medium.scale) * (480 * medium.scale)  # CamVid's files are 480x360
    assert medium.warm_start and medium.supervised_steps == medium.steps * medium.cycles
    assert set(PROFILES["medium"]) >= {"warm_start", "supervised_steps"}
    assert medium.pixels * medium.cycles / frame <= 0.0025


def test_head_cells_option_names_the_run_and_guards_old_runs(camvid_dir):
    """--head-cells all trains the projection head on the whole map (the way runs did before
    2026-12-03): its own folder and label; a saved contrastive run without the field counts as
    'all', so continuing it with the new default is a mismatch; runs without a head ignore it."""
    from model.simulation.config import differences
    from model.simulation.plots import run_label

    sparse, whole = tiny(camvid_dir, **CLUSTERED), tiny(camvid_dir, head_cells="all", **CLUSTERED)
    assert sparse.run_name == "region-entropy-umap-kmeans-seed0"
    assert whole.run_name == "region-entropy-umap-kmeans-headall-seed0"
    assert run_label(whole.to_dict()) == "region entropy umap-kmeans head-all"
    assert run_label(sparse.to_dict()) == "region entropy umap-kmeans"
    legacy = {key: value for key, value in sparse.to_dict().items() if key != "head_cells"}
    assert differences(legacy, sparse) == ["head_cells: 'all' -> 'labeled'"] and differences(legacy, whole) == []
    plain = tiny(camvid_dir)  # paper 000's CE training: no head
    assert plain.run_name == tiny(camvid_dir, head_cells="all").run_name == "pixel-balent-seed0"
    assert differences({k: v for k, v in plain.to_dict().items() if k != "head_cells"}, plain) == []
    with pytest.raises(ValueError, match="head_cells must be one of"):
        tiny(camvid_dir, head_cells="some")


def test_tasks_per_cycle_labels_k_new_images_the_most_informative_first(camvid_dir, tmp_path):
    """The product's loop: K random images at the cold start, then the K images not labeled yet
    with the highest task value under the cycle's model, n pixels each; never an image twice."""
    from model.acquisition import score_moments
    from model.calibration import image_value
    from model.checkpoint import load_checkpoint
    from model.mc_dropout import mc_moments
    from model.simulation.plots import run_label

    k = 2
    # dropout 0: the MC moments are deterministic, so the values can be recomputed here
    pool_size = 9  # 5 images still open when cycle 2 chooses: the choice of 2 is a real one
    config = tiny(camvid_dir, cycles=2, dropout=0.0, train_images=pool_size, tasks_per_cycle=k, task_order="value")
    result = run_simulation(config, tmp_path, progress=False, log=lambda _: None)
    assert result.folder.name == "pixel-balent-tasks2-value-seed0"
    assert run_label(config.to_dict()) == "pixel balent tasks2 value"
    state = load_state(result.folder)
    per_cycle = [[i for i, at in enumerate(state.revealed_at) if (at == cycle).any()] for cycle in (1, 2, 3)]
    assert [len(images) for images in per_cycle] == [k, k, k]
    assert len(set(sum(per_cycle, []))) == 3 * k  # each image labeled once
    for revealed_at in state.revealed_at:
        assert int((revealed_at > 0).sum()) in (0, N)
    assert [row["labeled_pixels"] for row in result.rows] == [N * k, 2 * N * k]
    # cycle 2's model (saved last) chose cycle 3's images: the best values among the open ones
    model, _ = load_checkpoint(result.folder / "model.pt")
    images, truth, _ = load_split(config, "train", pool_size)
    open_images = [i for i in range(pool_size) if i not in per_cycle[0] + per_cycle[1]]
    assert len(open_images) == 5
    values = {}
    for index in open_images:
        moments = mc_moments(model, images[index], config.mc_samples)[0]
        scores = score_moments("balent", moments)
        values[index] = image_value(scores, torch.from_numpy(truth[index].numpy() == IGNORE_INDEX))
    assert len(set(values.values())) == len(values)  # no ties
    assert sorted(per_cycle[2]) == sorted(sorted(open_images, key=lambda i: -values[i])[:k])

    random_order = tiny(camvid_dir, cycles=1, tasks_per_cycle=k, task_order="random")
    assert random_order.run_name == "pixel-balent-tasks2-random-seed0"
    with pytest.raises(ValueError, match="--mode pixel"):
        tiny(camvid_dir, mode="region", tasks_per_cycle=k)
    with pytest.raises(ValueError, match="tasks_per_cycle must be >= 1"):
        tiny(camvid_dir, tasks_per_cycle=0)
    with pytest.raises(ValueError, match="task_order must be one of"):
        tiny(camvid_dir, tasks_per_cycle=k, task_order="best")


def test_task_orders_value_an_image_as_documented():
    from model.acquisition import score_moments
    from model.calibration import image_value
    from model.moments import entropy, moments_from_samples
    from model.simulation.queries import task_value

    generator = torch.Generator().manual_seed(0)
    moments = moments_from_samples(torch.randn(8, 4, 20, 30, generator=generator).mul(3).softmax(dim=1))
    scores = score_moments("balent", moments)  # [20, 30] BalEntAcq
    exclude = torch.zeros(20, 30, dtype=torch.bool)
    exclude[0, :10] = True
    assert task_value("value", "balent", moments, scores, exclude) == image_value(scores, exclude, "balent")
    open_scores = scores[~exclude].sort(descending=True).values
    assert task_value("best-pixels", "balent", moments, scores, exclude) == float(open_scores[2])  # median of 5
    expected = float(entropy(moments.mean, dim=0)[~exclude].mean())
    assert task_value("mean-entropy", "balent", moments, scores, exclude) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="no value"):
        task_value("random", "balent", moments, scores, exclude)
