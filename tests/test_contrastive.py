"""Paper 004's training side: memory bank, anchor and bank selection, InfoNCE, EMA teacher,
the projection head, and contrastive training on real CamVid frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import ModelConfig, build_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.contrastive import (
    EmaTeacher,
    MemoryBank,
    anchor_indices,
    bank_candidates,
    contrastive_loss,
    info_nce,
    sample_embeddings,
)
from model.data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder, random_sparse_labels
from model.mc_dropout import mc_moments, mc_moments_and_embeddings
from model.training import TrainConfig, train


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# -- memory bank ------------------------------------------------------------------------


def test_memory_bank_is_a_fifo_per_class():
    bank = MemoryBank(num_classes=3, dim=2, capacity=5)
    first = torch.arange(6, dtype=torch.float32).view(3, 2)  # rows 0..2
    second = torch.arange(6, 14, dtype=torch.float32).view(4, 2)  # rows 3..6
    bank.push(1, first)
    bank.push(1, second)
    assert bank.sizes.tolist() == [0, 5, 0]
    kept = {tuple(row) for row in bank.class_vectors(1).tolist()}
    everything = [tuple(row) for row in torch.cat([first, second]).tolist()]
    assert kept == set(everything[2:]), "the two oldest rows must be the ones dropped"
    bank.push(1, torch.full((7, 2), -1.0))  # more than the capacity: only the newest 5 stay
    assert bank.class_vectors(1).eq(-1.0).all() and bank.sizes[1] == 5
    assert len(bank.class_vectors(0)) == 0 and len(bank) == 5


def test_memory_bank_state_round_trip_and_bad_state():
    bank = MemoryBank(num_classes=2, dim=3, capacity=4)
    bank.push(0, _unit(3, 3))
    bank.push(1, _unit(6, 3, seed=1))
    copy = MemoryBank.from_state_dict(bank.state_dict())
    for cls in range(2):
        assert torch.equal(copy.class_vectors(cls), bank.class_vectors(cls))
    copy.push(0, _unit(2, 3, seed=2))  # the ring position survived: the oldest row goes first
    assert copy.sizes[0] == 4 and len(bank) == 7
    with pytest.raises(ValueError, match="memory-bank"):
        MemoryBank.from_state_dict({"features": torch.zeros(2, 3)})


def test_bank_takes_correct_pixels_with_the_highest_entropy_per_image_and_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0])
    predictions = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0])  # pixel 2 and 5 are wrong
    entropy = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.2, 0.8, 0.7, 0.6])
    images = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    chosen = set(bank_candidates(labels, predictions, entropy, images, per_image=2).tolist())
    # image 0, class 0: correct are 0, 1, 3 -> the two most uncertain 1 (0.5) and 3 (0.3);
    # pixel 2 has the highest entropy but is misclassified. Class 1: only 4 is correct.
    # image 1, class 0: both.
    assert chosen == {1, 3, 4, 6, 7}


def test_anchors_are_half_hard_then_random():
    labels = torch.tensor([2] * 20 + [5] * 3)
    predictions = labels.clone()
    predictions[:6] = 0  # six hard pixels of class 2
    chosen = anchor_indices(labels, predictions, per_class=8, generator=torch.Generator().manual_seed(0))
    of_class_2 = chosen[labels[chosen] == 2]
    assert len(of_class_2) == 8 and len(set(of_class_2.tolist())) == 8
    assert int((predictions[of_class_2] != 2).sum()) == 4  # half of 8 hard, not all six
    assert sorted(chosen[labels[chosen] == 5].tolist()) == [20, 21, 22]  # fewer than asked: all


# -- InfoNCE ----------------------------------------------------------------------------


def test_info_nce_prefers_anchors_that_match_their_positive():
    anchors = _unit(8, 16)
    negatives = _unit(8, 32, 16, seed=1)
    identical = info_nce(anchors, anchors.clone(), negatives, temperature=0.1)
    mixed = info_nce(anchors, _unit(8, 16, seed=2), negatives, temperature=0.1)
    assert float(identical) < float(mixed)
    # by hand for one anchor: -log(exp(a.p / t) / (exp(a.p / t) + sum exp(a.n / t)))
    a, p, n = anchors[:1], anchors[:1], negatives[:1]
    logits = torch.cat([(a * p).sum(1), (n[0] @ a[0])]) / 0.1
    expected = -(logits[0] - torch.logsumexp(logits, 0))
    assert torch.allclose(info_nce(a, p, n, 0.1), expected, atol=1e-5)


def test_contrastive_loss_needs_a_positive_and_a_negative_class():
    bank = MemoryBank(num_classes=3, dim=8, capacity=50)
    anchors = _unit(4, 8)
    labels = torch.zeros(4, dtype=torch.int64)
    assert contrastive_loss(anchors, labels, bank) is None  # empty bank
    bank.push(0, _unit(10, 8, seed=1))
    assert contrastive_loss(anchors, labels, bank) is None  # no other class to contrast with
    bank.push(2, _unit(10, 8, seed=2))
    loss = contrastive_loss(anchors, labels, bank, negatives=6, generator=torch.Generator().manual_seed(0))
    assert loss is not None and torch.isfinite(loss)


def test_contrastive_loss_is_lower_for_clustered_classes():
    centers = _unit(2, 16, seed=3)
    bank = MemoryBank(num_classes=2, dim=16, capacity=40)
    for cls in range(2):
        bank.push(cls, F.normalize(centers[cls] + 0.05 * torch.randn(40, 16), dim=1))
    labels = torch.tensor([0, 0, 1, 1])
    near = F.normalize(centers[labels] + 0.05 * torch.randn(4, 16), dim=1)
    far = F.normalize(centers[1 - labels] + 0.05 * torch.randn(4, 16), dim=1)
    generator = torch.Generator().manual_seed(0)
    assert float(contrastive_loss(near, labels, bank, 20, 0.1, generator)) < float(
        contrastive_loss(far, labels, bank, 20, 0.1, generator)
    )


# -- EMA teacher ------------------------------------------------------------------------


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_update_arithmetic():
    torch.manual_seed(0)
    student = _tiny()
    teacher = EmaTeacher(student, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    student.train()
    student(torch.randn(4, 3))  # moves BatchNorm's running statistics and its batch counter
    teacher.update(student)
    after = teacher.model.state_dict()
    for name, value in student.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(after[name], 0.9 * before[name] + 0.1 * value), name
        else:
            assert torch.equal(after[name], value), name  # num_batches_tracked is copied
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_ema_warmup_copies_the_student_first_then_ramps_to_the_decay():
    student = _tiny()
    teacher = EmaTeacher(student, decay=0.99)
    with torch.no_grad():
        student[0].weight.add_(5.0)
    assert teacher.alpha() == 0.0
    teacher.update(student)
    assert torch.equal(teacher.model[0].weight, student[0].weight)
    teacher.updates = 9
    assert teacher.alpha() == pytest.approx(0.9)
    teacher.updates = 1000
    assert teacher.alpha() == 0.99


# -- the network's projection head --------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(num_classes=len(CAMVID_CLASSES), encoder_weights=None)).eval()


def test_sampled_embeddings_equal_the_upsampled_map(small_model):
    images = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))  # not a stride multiple
    with torch.no_grad():
        embeddings = small_model.embed(small_model.features(images))  # [2, 128, h, w]
        dense = F.normalize(small_model.upsample(embeddings, (70, 90)), dim=1)  # [2, 128, 70, 90]
        positions = torch.tensor([[0, 0, 0], [0, 69, 89], [1, 33, 47], [1, 5, 80], [0, 12, 3]])
        sampled = sample_embeddings(small_model, embeddings, (70, 90), positions)
    expected = dense[positions[:, 0], :, positions[:, 1], positions[:, 2]]
    assert torch.allclose(sampled, expected, atol=1e-5)
    assert torch.allclose(sampled.norm(dim=1), torch.ones(5), atol=1e-5)


def test_region_features_from_the_decoder_map_equal_those_of_the_upsampled_map(small_model):
    from model.regions import ROWS_PER_CHUNK, region_embeddings

    height, width = ROWS_PER_CHUNK + 37, 90  # two row chunks; not a multiple of the stride
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeddings = small_model.embed(small_model.features(image))[0]  # [128, h, w]
        upsampled = small_model.upsample(embeddings[None], (height, width))[0]  # [128, H, W]
    segments = (torch.arange(height)[:, None] // 9 * 10 + torch.arange(width)[None, :] // 9).numpy()
    segments = np.unique(segments, return_inverse=True)[1].reshape(height, width)
    chunked = region_embeddings(embeddings, segments, grid_size=small_model.padded_size((height, width)))
    np.testing.assert_allclose(chunked, region_embeddings(upsampled, segments), atol=1e-5)
    with pytest.raises(ValueError, match="grid_size"):
        region_embeddings(embeddings, segments)


def test_moments_with_embeddings_match_plain_mc_moments(small_model):
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1))
    plain = mc_moments(small_model, image, 6, generator=torch.Generator().manual_seed(3))[0]
    moments, embeddings = mc_moments_and_embeddings(small_model, image, 6, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(moments.mean, plain.mean) and torch.allclose(moments.mean_entropy, plain.mean_entropy)
    assert embeddings.shape == (128, 16, 24)  # decoder resolution: 1/4 of the padded 64 x 96


@pytest.mark.parametrize("train_mode", [False, True])
def test_head_at_labeled_cells_equals_the_whole_map(small_model, train_mode):
    """The training path's sparse head: the embeddings at labeled pixels, and in train mode the
    BatchNorm running statistics, equal those of the head run over the whole map."""
    from model.contrastive import CellEmbeddings, labeled_cells

    torch.manual_seed(0)
    head = small_model.projection
    features = torch.randn(2, small_model.feature_channels, 16, 20)  # [B, D, h, w]
    labels = torch.full((2, 64, 80), IGNORE_INDEX)
    labels[0, :3, :5] = 1  # a corner block: the zero padding of the 3x3 conv
    labels[1, 40, 79] = 2  # the right edge
    labels[1, 17, 33] = 0
    dropout = head.layers[3].p
    state = {k: v.clone() for k, v in head.state_dict().items()}
    try:
        head.layers[3].p = 0.0  # dropout draws differ between the two paths; the rest must not
        head.train(train_mode)
        full = head(features)  # [B, P, h, w]
        after_full = {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(state)
        keys = labeled_cells(labels, (16, 20), (64, 80))
        assert keys is not None and keys.numel() < 0.2 * 2 * 16 * 20
        cells = CellEmbeddings(keys, head.at_cells(features, keys, statistics_cells=None), (16, 20), (64, 80))
        positions = (labels != IGNORE_INDEX).nonzero()
        expected = sample_embeddings(small_model, full, (64, 80), positions)
        torch.testing.assert_close(cells.sample(positions), expected, atol=1e-5, rtol=1e-5)
        for name, value in head.state_dict().items():  # running statistics moved alike (or not at all)
            torch.testing.assert_close(value, after_full[name], atol=1e-6, rtol=1e-5)
    finally:
        head.layers[3].p = dropout
        head.load_state_dict(state)
        head.eval()


def test_head_statistics_from_sampled_cells_are_close_to_the_whole_map(small_model):
    torch.manual_seed(0)
    head = small_model.projection
    features = torch.randn(4, small_model.feature_channels, 32, 32)  # 4096 cells
    keys = torch.arange(0, 4096, 37)
    dropout = head.layers[3].p
    state = {k: v.clone() for k, v in head.state_dict().items()}
    try:
        head.layers[3].p = 0.0
        head.train()
        exact = head.at_cells(features, keys, statistics_cells=None)
        head.load_state_dict(state)
        sampled = head.at_cells(features, keys, statistics_cells=1024)  # a quarter of the map
        assert not torch.equal(exact, sampled)  # the statistics did come from a sample
        assert (exact * sampled).sum(1).min() > 0.99
    finally:
        head.layers[3].p = dropout
        head.load_state_dict(state)
        head.eval()


def test_dense_labels_run_the_head_on_the_whole_map():
    from model.contrastive import labeled_cells

    labels = torch.zeros(2, 64, 80, dtype=torch.int64)  # every pixel labeled
    assert labeled_cells(labels, (16, 20), (64, 80)) is None


def test_bf16_projection_head_gives_the_fp32_region_features(camvid_dir):
    """The head in bf16 (/predict's default where bf16 is native): same moments, region
    features of a real 480x360 frame (300 SEEDS superpixels) within 0.001 of fp32's."""
    from model.data import load_image
    from model.precision import bf16_is_native
    from model.regions import region_embeddings
    from model.superpixels import seeds_superpixels

    if not bf16_is_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES))).eval()  # packaged ImageNet encoder
    image = load_image(sorted((camvid_dir / "val").glob("*.png"))[0])  # [3, 360, 480]
    runs = {
        precision: mc_moments_and_embeddings(
            model, image, 4, generator=torch.Generator().manual_seed(3), embedding_precision=precision
        )
        for precision in ("fp32", "bf16")
    }
    (moments, exact), (moments_bf16, rounded) = runs["fp32"], runs["bf16"]
    assert torch.equal(moments.mean, moments_bf16.mean)  # the class probabilities stay fp32
    assert rounded.dtype == torch.float32
    assert torch.allclose(rounded.norm(dim=0), torch.ones(()), atol=1e-5)  # unit again after the rounding
    pixel_cosine = (exact * rounded).sum(0)  # [h, w]
    assert pixel_cosine.min() > 0.99 and pixel_cosine.mean() > 0.999
    rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    segments = seeds_superpixels(rgb, 300)
    grid = model.padded_size(tuple(image.shape[-2:]))
    features = {name: region_embeddings(maps, segments, grid) for name, maps in (("fp32", exact), ("bf16", rounded))}
    region_cosine = (features["fp32"] * features["bf16"]).sum(1)  # [K]
    assert region_cosine.min() > 0.999, region_cosine.min()


def test_no_projection_head_gives_a_clear_error():
    model = build_model(ModelConfig(num_classes=3, encoder_weights=None, projection_dim=0))
    with pytest.raises(ValueError, match="projection_dim"):
        model.embed(torch.zeros(1, model.feature_channels, 4, 4))
    image, labels = torch.rand(3, 32, 32), torch.zeros(32, 32, dtype=torch.int64)
    with pytest.raises(ValueError, match="projection head"):
        train(model, [(image, labels)], TrainConfig(steps=1, batch_size=2, crop_size=(32, 32)))


# -- training on CamVid ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_camvid(camvid_dir):
    """Four frames at quarter size with 300 random labeled pixels each (several classes)."""
    folder = SegmentationFolder(camvid_dir, "train", scale=0.25)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in (0, 90, 180, 270):
        image, dense = folder[index]
        samples.append((image, random_sparse_labels(dense, 300, generator)))
    return samples


def test_contrastive_training_fills_the_bank_and_returns_a_teacher(sparse_camvid, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))
    # teacher_tolerance=None: the lagging teacher of 12 steps is returned all the same
    config = TrainConfig(steps=12, batch_size=2, crop_size=(90, 120), seed=0, bank_capacity=30, teacher_tolerance=None)
    result = train(model, sparse_camvid, config)
    bank = result.memory_bank
    assert bank is not None and result.teacher is not None
    labeled_classes = {int(c) for _, labels in sparse_camvid for c in labels.unique() if c != IGNORE_INDEX}
    filled = {c for c in range(bank.num_classes) if bank.sizes[c] > 0}
    assert filled and filled <= labeled_classes and int(bank.sizes.max()) <= 30
    vectors, _ = bank.vectors()
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-4)
    assert result.contrastive_losses and all(loss > 0 for loss in result.contrastive_losses)
    # the teacher trails the student: close to it, not equal
    student_weight, teacher_weight = model.classifier.weight, result.teacher.classifier.weight
    assert not torch.equal(student_weight, teacher_weight)

    path = save_checkpoint(tmp_path / "m.pt", result.teacher, class_names=CAMVID_CLASSES, version=1, memory_bank=bank)
    loaded, meta = load_checkpoint(path)
    assert torch.equal(meta["memory_bank"].class_vectors(0), bank.class_vectors(0).cpu())
    assert torch.equal(loaded.projection.layers[-1].weight, result.teacher.projection.layers[-1].weight)

    # a second run continues the bank it is given
    again = train(model, sparse_camvid, TrainConfig(steps=2, batch_size=2, crop_size=(90, 120)), memory_bank=bank)
    assert again.memory_bank is bank


def test_plain_training_has_no_bank_and_no_teacher(sparse_camvid):
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES), encoder_weights=None, projection_dim=0))
    result = train(
        model, sparse_camvid, TrainConfig(steps=2, batch_size=2, crop_size=(90, 120), contrastive_weight=0, ema_decay=None)
    )
    assert result.memory_bank is None and result.teacher is None and not result.contrastive_losses


def test_format_1_checkpoints_load_without_a_projection_head(tmp_path):
    model = build_model(ModelConfig(num_classes=3, encoder_weights=None, projection_dim=0))
    path = save_checkpoint(tmp_path / "old.pt", model, class_names=["a", "b", "c"], version=1)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 1
    del payload["model_config"]["projection_dim"]
    del payload["memory_bank"]
    torch.save(payload, path)
    loaded, meta = load_checkpoint(path)
    assert loaded.projection is None and meta["memory_bank"] is None


def test_a_bank_of_another_shape_is_refused_at_save(tmp_path, small_model):
    with pytest.raises(ValueError, match="memory bank"):
        save_checkpoint(
            tmp_path / "m.pt", small_model, class_names=CAMVID_CLASSES, version=1, memory_bank=MemoryBank(3, 128, 4)
        )
