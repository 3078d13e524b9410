"""Semi-supervised training (paper 003): the pseudo-label loss on hand-built tensors, ClassMix's
bookkeeping, the replay buffer, and a real run on CamVid frames with the option on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model
from model.data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder, random_sparse_labels
from model.semi import (
    PseudoBatch,
    ReplayBuffer,
    balanced_class_weights,
    class_mask,
    class_mix,
    pseudo_label_loss,
    pseudo_labels,
    strong_views,
)
from model.training import TrainConfig, sparse_cross_entropy, train

CLASSES = 3


def _batch(pseudo, confidence, labels=None, valid=None) -> PseudoBatch:
    pseudo = torch.tensor(pseudo)
    shape = pseudo.shape
    return PseudoBatch(
        images=torch.rand(shape[0], 3, *shape[1:]),
        labels=torch.full(shape, IGNORE_INDEX) if labels is None else torch.tensor(labels),
        valid=torch.ones(shape, dtype=torch.bool) if valid is None else torch.tensor(valid),
        pseudo=pseudo,
        confidence=torch.tensor(confidence),
    )


def test_pseudo_labels_are_the_teachers_argmax_and_its_probability():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]).T.reshape(1, 3, 1, 2)  # [1, C, 1, 2]
    pseudo, confidence = pseudo_labels(logits)
    assert pseudo.tolist() == [[[0, 2]]]
    expected = F.softmax(logits, dim=1).amax(dim=1)
    assert torch.allclose(confidence, expected)


def test_loss_is_confidence_weighted_ce_over_unlabeled_pixels_scaled_by_eta():
    # one image of 4 pixels: pixel 0 labeled, pixel 3 padding, pixels 1-2 unlabeled
    batch = _batch(
        pseudo=[[[0, 1, 2, 0]]],
        confidence=[[[0.99, 0.98, 0.5, 0.99]]],
        labels=[[[1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]],
        valid=[[[True, True, True, False]]],
    )
    logits = torch.randn(1, CLASSES, 1, 4)
    ce = F.cross_entropy(logits, batch.pseudo, reduction="none")[0, 0]  # [4]
    eta = 2 / 3  # pixels 0 and 1 are above 0.97 among the 3 valid ones
    expected = eta * (0.98 * ce[1] + 0.5 * ce[2]) / 2
    assert torch.isclose(pseudo_label_loss(logits, batch), expected)

    # the labeled pixel and the padding do not matter, whatever the student says there
    changed = logits.clone()
    changed[..., 0] += torch.tensor([9.0, -9.0, 3.0]).view(1, 3, 1)
    changed[..., 3] -= torch.tensor([5.0, 0.0, 5.0]).view(1, 3, 1)
    assert torch.isclose(pseudo_label_loss(changed, batch), expected)

    # a floor on the confidence leaves the unsure pixel out (it still counts in the mean)
    floored = pseudo_label_loss(logits, batch, min_confidence=0.9)
    assert torch.isclose(floored, eta * 0.98 * ce[1] / 2)
    changed = logits.clone()
    changed[..., 2] += torch.tensor([4.0, 4.0, -4.0]).view(1, 3, 1)
    assert torch.isclose(pseudo_label_loss(changed, batch, min_confidence=0.9), floored)


def test_an_unsure_teacher_or_a_fully_labeled_image_adds_nothing():
    logits = torch.randn(2, CLASSES, 2, 2)
    unsure = _batch(pseudo=[[[0, 1], [2, 0]]] * 2, confidence=[[[0.9, 0.8], [0.6, 0.96]]] * 2)
    assert float(pseudo_label_loss(logits, unsure)) == 0.0  # eta = 0: no pixel above 0.97
    labeled = _batch(pseudo=[[[0, 1], [2, 0]]] * 2, confidence=[[[0.99] * 2] * 2] * 2, labels=[[[0, 1], [2, 0]]] * 2)
    assert float(pseudo_label_loss(logits, labeled)) == 0.0
    with pytest.raises(ValueError, match="strong views"):
        pseudo_label_loss(torch.randn(1, CLASSES, 2, 2), unsure)


def test_loss_gradient_pulls_the_student_towards_the_pseudo_labels():
    batch = _batch(pseudo=[[[2, 2], [1, 0]]], confidence=[[[0.99, 0.99], [0.99, 0.99]]])
    logits = torch.zeros(1, CLASSES, 2, 2, requires_grad=True)
    pseudo_label_loss(logits, batch).backward()
    target = F.one_hot(batch.pseudo, CLASSES).permute(0, 3, 1, 2).bool()  # [1, C, 2, 2]
    assert (logits.grad[target] < 0).all() and (logits.grad[~target] > 0).all()


def test_class_mix_takes_every_field_from_the_source_inside_the_mask():
    generator = torch.Generator().manual_seed(0)
    shape = (2, 5, 6)
    target = PseudoBatch(
        torch.rand(2, 3, 5, 6, generator=generator), torch.randint(0, 3, shape, generator=generator),
        torch.rand(shape, generator=generator) > 0.2, torch.randint(0, 3, shape, generator=generator),
        torch.rand(shape, generator=generator),
    )
    source = PseudoBatch(
        torch.rand(2, 3, 5, 6, generator=generator), torch.full(shape, IGNORE_INDEX),
        torch.ones(shape, dtype=torch.bool), torch.randint(0, 3, shape, generator=generator),
        torch.rand(shape, generator=generator),
    )
    masks = torch.rand(shape, generator=generator) > 0.5
    mixed = class_mix(target, source, masks)
    for name in ("labels", "valid", "pseudo", "confidence"):
        out, src, tgt = getattr(mixed, name), getattr(source, name), getattr(target, name)
        assert torch.equal(out[masks], src[masks]) and torch.equal(out[~masks], tgt[~masks]), name
    pixels = masks[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(mixed.images[pixels], source.images[pixels])
    assert torch.equal(mixed.images[~pixels], target.images[~pixels])
    with pytest.raises(ValueError, match="masks"):
        class_mix(target, source, masks[0])


def test_class_mask_pastes_half_the_present_classes_and_only_valid_pixels():
    pseudo = torch.tensor([[0, 0, 1, 1, 2], [2, 4, 4, 0, 1]])  # classes 0, 1, 2, 4 present
    valid = torch.ones_like(pseudo, dtype=torch.bool)
    valid[1, 1] = False
    weights = torch.ones(6, dtype=torch.float64)
    seen = set()
    for seed in range(30):
        mask = class_mask(pseudo, valid, weights, torch.Generator().manual_seed(seed))
        chosen = set(pseudo[mask].tolist())
        assert len(chosen) == 2 and chosen <= {0, 1, 2, 4}
        assert torch.equal(mask, torch.isin(pseudo, torch.tensor(sorted(chosen))) & valid)
        seen |= chosen
    assert seen == {0, 1, 2, 4}
    assert not class_mask(pseudo, torch.zeros_like(valid), weights, torch.Generator()).any()


def test_balanced_weights_favour_tail_classes_in_the_paste():
    counts = torch.tensor([500, 400, 10, 5, 0])  # head: 0 and 1 (>= 1/5 of the labels)
    weights = balanced_class_weights(counts, tail_weight=3.0)
    assert weights.tolist() == [1.0, 1.0, 3.0, 3.0, 3.0]
    pseudo = torch.tensor([[0, 1, 2, 3]])
    valid = torch.ones_like(pseudo, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    tail = sum(int(mask[0, 2:].sum()) for mask in (class_mask(pseudo, valid, weights, generator) for _ in range(400)))
    head = sum(int(mask[0, :2].sum()) for mask in (class_mask(pseudo, valid, weights, generator) for _ in range(400)))
    assert tail > 1.5 * head, (tail, head)
    with pytest.raises(ValueError, match="tail_weight"):
        balanced_class_weights(counts, tail_weight=0.0)


def test_replay_buffer_keeps_the_last_crops_compactly_and_samples_them():
    buffer = ReplayBuffer(capacity=3)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1, torch.Generator())
    batches = [_batch(pseudo=[[[k, 1]]], confidence=[[[0.5, 0.25]]]) for k in range(5)]
    for batch in batches:
        buffer.add(batch)
    assert len(buffer) == 3
    drawn = buffer.sample(40, torch.Generator().manual_seed(0))
    assert {int(p[0, 0]) for p in drawn.pseudo} == {2, 3, 4}  # the first two were pushed out
    assert drawn.pseudo.dtype == torch.int64 and drawn.images.dtype == torch.float32
    first = next(i for i in range(40) if int(drawn.pseudo[i, 0, 0]) == 2)
    assert torch.allclose(drawn.images[first], batches[2].images[0], atol=1e-3)  # fp16 storage
    assert drawn.confidence[first].tolist() == [[0.5, 0.25]]


def test_strong_views_keep_pixels_and_their_labels_together():
    generator = torch.Generator().manual_seed(1)
    shape = (4, 6, 8)
    current = PseudoBatch(
        torch.rand(4, 3, 6, 8, generator=generator), torch.full(shape, IGNORE_INDEX),
        torch.ones(shape, dtype=torch.bool), torch.randint(0, 3, shape, generator=generator),
        torch.randint(0, 1024, shape, generator=generator) / 1024,  # exact in the buffer's fp16
    )
    current.labels[:, 0, 0] = 1
    replay = ReplayBuffer()
    weights = torch.ones(CLASSES, dtype=torch.float64)
    first = strong_views(current, replay, weights, generator)  # empty buffer: all within the batch
    replay.add(current)
    second = strong_views(current, replay, weights, generator)
    for views in (first, second):
        assert views.images.shape == current.images.shape
        for index in range(4):
            # every pixel's (pseudo label, confidence) pair comes from one crop of the batch, at that pixel
            pairs = torch.stack([views.pseudo[index].double(), views.confidence[index].double()])
            candidates = torch.stack([current.pseudo.double(), current.confidence.double()], dim=1)  # [B, 2, H, W]
            matches = (candidates == pairs).all(dim=1)  # [B, H, W]
            assert matches.any(dim=0).all()
            pasted = ~matches[index]  # pixels that did not stay the target's
            assert pasted.any() and not pasted.all()


@pytest.fixture(scope="module")
def small_camvid(camvid_dir) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four training frames at quarter size (120 x 90), 30 random labeled pixels each."""
    folder = SegmentationFolder(camvid_dir, "train", scale=0.25)
    generator = torch.Generator().manual_seed(0)
    return [
        (image, random_sparse_labels(dense, 30, generator))
        for image, dense in (folder[index] for index in (0, 90, 180, 270))
    ]


def test_semi_supervised_training_on_camvid_runs_and_lowers_the_loss(small_camvid):
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))  # packaged ImageNet encoder
    # alpha 0.9 (the backend's): a 0.99 teacher of 100 steps still averages in its start and was
    # sure of an unlabeled pixel in 0-2 of the steps (4 runs), so this test passed by chance with it
    config = TrainConfig(
        steps=100, batch_size=4, crop_size=(90, 120), lr=2e-3, seed=0, semi_supervised=True, ema_decay=0.9
    )
    result = train(model, small_camvid, config)
    warmup = math.floor(config.semi_warmup * config.steps)
    assert len(result.pseudo_losses) == config.steps - warmup  # every step after the warm-up
    assert all(math.isfinite(loss) for loss in result.losses)
    confident = sum(loss > 0 for loss in result.pseudo_losses)  # steps whose teacher was sure of some pixels
    assert confident >= 0.3 * len(result.pseudo_losses), confident
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    teacher = result.teacher
    with torch.no_grad():
        images = torch.stack([image for image, _ in small_camvid])
        labels = torch.stack([labels for _, labels in small_camvid])
        assert float(sparse_cross_entropy(teacher(images), labels)) < 0.8 * first


def test_semi_supervised_needs_the_teacher():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(semi_supervised=True, ema_decay=None)
    with pytest.raises(ValueError, match="semi_warmup"):
        TrainConfig(semi_supervised=True, semi_warmup=1.0)
