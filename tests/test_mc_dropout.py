"""MC-dropout inference on a real network forward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from model import acquisition
from model.acquisition import score, score_moments
from model.mc_dropout import (
    CHUNK_ELEMENTS,
    _moments_from_features,
    chunk_size_for,
    mc_moments,
    mc_samples,
    predict_probabilities,
)
from model.moments import MomentAccumulator, moments_from_samples
from model.network import ModelConfig, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(ModelConfig(num_classes=5, encoder_weights=None, dropout=0.3))
    # random init gives near-uniform logits; a larger classifier makes the dropout visible
    with torch.no_grad():
        net.classifier.weight.mul_(20)
    return net.eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 45, 70, generator=torch.Generator().manual_seed(1))


def test_mc_samples_vary_and_eval_forward_is_deterministic(model, image):
    samples = mc_samples(model, image, num_samples=8, generator=torch.Generator().manual_seed(0))
    assert samples.shape[:2] == (8, 5)
    assert samples.std(0).max() > 1e-3, "MC dropout must give different samples"
    batch = image.unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(batch), rtol=0, atol=0)
    assert not model.training


def test_masked_classifier_equals_channel_dropout_on_features(model, image):
    """Dropping classifier columns is exactly Dropout2d on the decoder features."""
    keep = 1 - model.dropout.p
    samples = mc_samples(model, image, num_samples=3, generator=torch.Generator().manual_seed(5))
    masks = (torch.rand(3, model.feature_channels, generator=torch.Generator().manual_seed(5)) < keep).float()
    with torch.no_grad():
        features = model.features(image.unsqueeze(0))  # [1, D, h, w]
        for index in range(3):
            dropped = features * masks[index].view(1, -1, 1, 1) / keep
            expected = F.softmax(model.classifier(dropped), dim=1)[0]
            torch.testing.assert_close(samples[index], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 20])
def test_streamed_inference_matches_stored_samples(model, image, chunk_size):
    stored = mc_samples(model, image, num_samples=20, generator=torch.Generator().manual_seed(2))
    streamed = mc_moments(
        model, image, 20, generator=torch.Generator().manual_seed(2), chunk_size=chunk_size, image_resolution=False
    )[0]
    direct = moments_from_samples(stored)
    torch.testing.assert_close(streamed.mean, stored.double().mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(streamed.variance, stored.double().var(0), rtol=1e-4, atol=1e-9)
    for name in acquisition.names():
        streamed_scores = score_moments(name, streamed, generator=torch.Generator().manual_seed(9))
        stored_scores = score(name, stored, generator=torch.Generator().manual_seed(9))
        if name == "balent":
            # a chunk's logits are one matrix product whose float32 rounding depends on its
            # shape (1e-8 between chunk sizes with MKL on an AVX2 CPU), and BalEntAcq =
            # 1 / BalEnt near BalEnt = 0 makes that relative 4e-5: compare BalEnt itself
            streamed_scores, stored_scores = (torch.where(s > 0, 1 / s, s) for s in (streamed_scores, stored_scores))
        torch.testing.assert_close(streamed_scores, stored_scores, rtol=1e-5, atol=1e-7, msg=name)
    assert direct.num_samples == streamed.num_samples == 20


def test_moments_without_the_mean_entropy_serve_every_other_acquisition(model, image):
    """mean_entropy=False skips only E_s[H(p_s)]: the same masks, the same mean and second
    moment, the same scores for every heuristic that does not read it, and a clear error for
    the ones that do."""
    full = mc_moments(model, image, 20, generator=torch.Generator().manual_seed(4))[0]
    lean = mc_moments(model, image, 20, generator=torch.Generator().manual_seed(4), mean_entropy=False)[0]
    assert lean.mean_entropy is None and full.mean_entropy is not None
    torch.testing.assert_close(lean.mean, full.mean, rtol=0, atol=0)
    torch.testing.assert_close(lean.second, full.second, rtol=0, atol=0)
    readers = {name for name in acquisition.names() if acquisition.needs_mean_entropy(name)}
    assert readers == {"bald", "powerbald"}
    for name in acquisition.names():
        if name in readers:
            with pytest.raises(ValueError, match="mean_entropy=True"):
                score_moments(name, lean, generator=torch.Generator().manual_seed(9))
        else:
            torch.testing.assert_close(
                score_moments(name, lean, generator=torch.Generator().manual_seed(9)),
                score_moments(name, full, generator=torch.Generator().manual_seed(9)),
                msg=name,
            )


def test_default_chunks_fit_the_element_budget(model):
    """A chunk holds CHUNK_ELEMENTS softmax values at most (never fewer than one sample)."""
    small = torch.zeros(1, model.feature_channels, 92, 120)  # 480x360 at 1/4
    large = torch.zeros(2, model.feature_channels, 512, 512)
    assert chunk_size_for(model, small) * model.num_classes * 92 * 120 <= CHUNK_ELEMENTS
    assert chunk_size_for(model, small) >= 20  # a 480x360 image: all default samples in one product
    assert chunk_size_for(model, large) == 1


def test_moments_come_back_at_the_image_resolution(model, image):
    batch = torch.stack([image, image.flip(-1)])
    moments = mc_moments(model, batch, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert len(moments) == 2
    for m in moments:
        assert m.mean.shape == (5, 45, 70) and m.mean_entropy.shape == (45, 70)
        torch.testing.assert_close(m.mean.sum(0), torch.ones(45, 70, dtype=torch.float64))
        assert (m.variance >= 0).all()
    # with many samples the MC mean agrees with the deterministic prediction on most pixels
    many = mc_moments(model, image, num_samples=100, generator=torch.Generator().manual_seed(0))[0]
    agree = predict_probabilities(model, image).argmax(1)[0] == many.mean.argmax(0)
    assert agree.float().mean() > 0.85


def test_bad_inputs_are_refused(model):
    with pytest.raises(ValueError, match="num_samples"):
        mc_moments(model, torch.rand(3, 32, 32), num_samples=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        mc_moments(model, torch.rand(1, 32, 32))


def test_logit_kernel_matches_torch_softmax_and_sums():
    """MomentAccumulator.update_logits (one numba pass on the CPU) against torch's softmax fed
    to update: large and degenerate logits, a NaN pixel, chunks summed as one."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 6, 9, 13, generator=generator) * 8  # [k, C, h, w]
    logits[:, 0, 0, 0] = 500.0  # one class dominates: p = 1, others underflow
    logits[:, :, 1, 1] = -300.0  # all equal: uniform
    logits[4, 2, 2, 2] = float("nan")
    for mean_entropy in (False, True):
        kernel, reference = MomentAccumulator(mean_entropy), MomentAccumulator(mean_entropy)
        for chunk in logits.split(7):
            kernel.update_logits(chunk)
        reference.update(logits.softmax(dim=1))
        fast, slow = kernel.result(), reference.result()
        nan = torch.zeros(9, 13, dtype=torch.bool)
        nan[2, 2] = True
        assert fast.mean[:, nan].isnan().all() and not fast.mean[:, ~nan].isnan().any()
        torch.testing.assert_close(fast.mean[:, ~nan], slow.mean[:, ~nan], rtol=0, atol=1e-7)
        torch.testing.assert_close(fast.second[:, ~nan], slow.second[:, ~nan], rtol=0, atol=1e-7)
        if mean_entropy:
            torch.testing.assert_close(fast.mean_entropy[~nan], slow.mean_entropy[~nan], rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.mean[:, 1, 1], torch.full((6,), 1 / 6, dtype=torch.float64))
        assert fast.num_samples == 20
    # with a base, sample s's logits are base + logits[s]; a NaN in the base makes its pixel NaN
    base = torch.randn(6, 9, 13, generator=generator) * 30
    base[1, 3, 4] = float("nan")
    split, whole = MomentAccumulator(), MomentAccumulator()
    split.update_logits(logits, base)
    whole.update_logits(logits + base)
    torch.testing.assert_close(split.result().mean, whole.result().mean, rtol=0, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(split.result().mean_entropy, whole.result().mean_entropy, rtol=0, atol=1e-6,
                               equal_nan=True)  # fmt: skip
    assert split.result().mean[:, 3, 4].isnan().all()
    with pytest.raises(ValueError, match="one sample's shape"):
        MomentAccumulator().update_logits(logits, base[:, :4])


def test_bf16_sampling_moves_the_moments_far_less_than_the_sampling_does(model, image):
    """The masked product in bf16 gives deviations from float32 deterministic logits. Shifting
    every logit by 100 (the bias; the softmax is unchanged) shows why: bf16 logits of 100 are
    0.5 apart, which would move the moments as much as another seed does, while the
    deviations do not grow with the shift."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.classifier.bias += 100.0
        features = model.features(image.unsqueeze(0))  # [1, D, h, w]

    @torch.no_grad()
    def moments(net, precision, seed):
        generator = torch.Generator().manual_seed(seed)
        return _moments_from_features(net, features, 20, generator, None, True, precision)[0]

    reference = moments(model, "fp32", 0)
    sampling = (moments(model, "fp32", 1).mean - reference.mean).abs().max()  # another seed's masks
    for net in (model, shifted):
        fast = moments(net, "bf16", 0)
        assert (fast.mean - reference.mean).abs().max() < 0.02 * sampling
        assert (fast.variance - reference.variance).abs().max() < 0.02 * reference.variance.max()
        assert (fast.mean_entropy - reference.mean_entropy).abs().max() < 0.02 * sampling


def test_moments_under_a_bf16_autocast_are_float32_moments(model, image):
    """A caller's autocast (training code is full of them) changes the network's precision,
    not the sampled classifier's: the moments come out as without it, to bf16's rounding of
    the features."""
    plain = mc_moments(model, image, 8, generator=torch.Generator().manual_seed(6), image_resolution=False)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mc_moments(model, image, 8, generator=torch.Generator().manual_seed(6), image_resolution=False)[0]
    assert mixed.mean.dtype == torch.float64 and torch.isfinite(mixed.mean).all()
    torch.testing.assert_close(mixed.mean, plain.mean, rtol=0, atol=0.05)
