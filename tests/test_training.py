"""Sparse-label training on real CamVid frames: the loss on the labeled pixels must fall."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from model import ModelConfig, build_model
from model.data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder, random_sparse_labels
from model.training import TrainConfig, sparse_cross_entropy, train

PIXELS_PER_IMAGE = 50


@pytest.fixture(scope="module")
def sparse_camvid(camvid_dir) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four training frames at half size (240 x 180), 50 random labeled pixels each."""
    folder = SegmentationFolder(camvid_dir, "train", scale=0.5)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in (0, 90, 180, 270):  # different sequences of the split
        image, dense = folder[index]
        samples.append((image, random_sparse_labels(dense, PIXELS_PER_IMAGE, generator)))
    return samples


def _labeled_loss(model, samples) -> float:
    """Eq. 5 on the given samples, whole images, eval mode."""
    model.eval()
    with torch.no_grad():
        images = torch.stack([image for image, _ in samples])
        labels = torch.stack([labels for _, labels in samples])
        return float(sparse_cross_entropy(model(images), labels))


def _small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(num_classes=len(CAMVID_CLASSES), encoder_weights=None))


def test_sparse_training_lowers_loss_on_labeled_pixels(sparse_camvid):
    assert all(int((labels != IGNORE_INDEX).sum()) == PIXELS_PER_IMAGE for _, labels in sparse_camvid)
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))  # packaged ImageNet encoder
    before = _labeled_loss(model, sparse_camvid)
    calls = []
    config = TrainConfig(steps=30, batch_size=2, crop_size=(180, 240), seed=0)
    result = train(model, sparse_camvid, config, progress=lambda *args: calls.append(args))
    after = _labeled_loss(model, sparse_camvid)

    assert result.steps == 30 and len(result.losses) == 30 and result.skipped_steps == 0
    assert result.num_images == 4 and result.num_labeled_pixels == 4 * PIXELS_PER_IMAGE
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert [(step, total) for step, total, _ in calls] == [(step, 30) for step in range(1, 31)]
    assert [loss for _, _, loss in calls] == result.losses
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert after < 0.8 * before, (before, after)
    assert not model.training  # the mode it had before training


def test_same_seed_reproduces_run_and_leaves_global_rng_alone(sparse_camvid):
    model = _small_model()
    twin = copy.deepcopy(model)
    config = TrainConfig(steps=3, batch_size=2, crop_size=(64, 64), seed=5)
    rng_before = torch.random.get_rng_state()
    first = train(model, sparse_camvid, config)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    second = train(twin, sparse_camvid, config)
    assert first.losses == second.losses
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


def test_unlabeled_images_are_dropped_and_one_image_still_trains(sparse_camvid):
    image, labels = sparse_camvid[0]
    empty = (image, torch.full_like(labels, IGNORE_INDEX))
    model = _small_model()
    model.train()
    result = train(model, [empty, (image, labels), empty], TrainConfig(steps=2, batch_size=2, crop_size=(96, 96)))
    assert result.num_images == 1 and result.num_labeled_pixels == PIXELS_PER_IMAGE
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert model.training  # restored


def test_epochs_set_the_number_of_steps(sparse_camvid):
    config = TrainConfig(epochs=2, batch_size=3, crop_size=(48, 48))
    assert config.total_steps(4) == 4  # ceil(4 / 3) steps per epoch
    result = train(_small_model(), sparse_camvid, config)
    assert result.steps == 4


def test_bad_input_raises_clear_errors(sparse_camvid):
    image, labels = sparse_camvid[0]
    model = _small_model()
    with pytest.raises(ValueError, match="has a labeled pixel"):
        train(model, [(image, torch.full_like(labels, IGNORE_INDEX))], TrainConfig(steps=1))
    void = labels.clone()
    void[0, 0] = 11  # CamVid void left unmapped
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        train(model, [(image, void)], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="floats in"):
        train(model, [((image * 255).to(torch.uint8), labels)], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_bf16_autocast_trains_like_fp32(sparse_camvid):
    """The same run in bf16 autocast (channels-last) and in fp32 (contiguous): the labeled
    pixels' cross-entropy falls in both, and the first step's loss differs by rounding only;
    the returned model is contiguous and fp32 again."""
    from model.precision import bf16_is_native

    if not bf16_is_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX); autocast would be emulated")
    runs = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))  # packaged ImageNet encoder
        # the teacher of so short a run lags its student: kept anyway (teacher_tolerance=None) to check its layout
        config = TrainConfig(steps=30, batch_size=2, crop_size=(180, 240), seed=0, precision=precision,
                             channels_last=channels_last, teacher_tolerance=None)  # fmt: skip
        before = _labeled_loss(model, sparse_camvid)
        result = train(model, sparse_camvid, config)
        after = _labeled_loss(model, sparse_camvid)  # fp32, eval, whole images
        assert result.precision == precision
        assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
        assert all(p.is_contiguous() for p in result.teacher.parameters())
        assert result.memory_bank.features.dtype == torch.float32
        runs[precision] = result.losses
        assert after < 0.9 * before, (precision, before, after)
    # the first step starts from the same weights and batch: rounding is all that differs
    assert abs(runs["bf16"][0] - runs["fp32"][0]) < 0.05 * runs["fp32"][0]


def test_precision_is_resolved_for_the_device_or_refused_clearly():
    from model.precision import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="int8")


def test_automatic_schedule_grows_with_the_labeled_images_and_shrinks_when_warm():
    from model.training import AUTO_MAX_STEPS, AUTO_MIN_STEPS, auto_steps

    assert auto_steps(1, 4, warm_start=True) == AUTO_MIN_STEPS  # 35 steps, raised to the floor
    cold = [auto_steps(n, 4, warm_start=False) for n in (8, 40, 400, 100_000)]
    assert cold == sorted(cold) and cold[-1] == AUTO_MAX_STEPS
    assert auto_steps(40, 4, warm_start=True) < auto_steps(40, 4, warm_start=False)
    with pytest.raises(ValueError):
        auto_steps(0, 4, warm_start=False)


def test_a_teacher_far_worse_on_the_labeled_pixels_is_not_served(sparse_camvid):
    """The check after training: a healthy teacher is kept with both accuracies recorded; one
    that predicts a single class everywhere is dropped for the student."""
    from model.training import TrainResult, _check_teacher, labeled_accuracy

    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))
    config = TrainConfig(steps=6, batch_size=2, crop_size=(90, 120), seed=0, ema_decay=0.5)
    result = train(model, sparse_camvid, config)
    assert result.teacher is not None and not result.teacher_rejected
    assert 0.0 <= result.teacher_accuracy <= 1.0
    assert result.teacher_accuracy >= result.student_accuracy - config.teacher_tolerance
    assert result.student_accuracy == pytest.approx(labeled_accuracy(model, sparse_camvid, torch.device("cpu")))

    collapsed = copy.deepcopy(model).eval()
    with torch.no_grad():  # one class wins at every pixel
        collapsed.classifier.bias.copy_(torch.full_like(collapsed.classifier.bias, -1e4))
        collapsed.classifier.bias[CAMVID_CLASSES.index("Pedestrian")] = 1e4
    broken = TrainResult(teacher=collapsed)
    _check_teacher(broken, model, sparse_camvid, torch.device("cpu"), config.teacher_tolerance)
    assert broken.teacher is None and broken.teacher_rejected
    # the collapsed teacher is right exactly on the labeled pixels of that class
    labels = torch.cat([lab[lab != IGNORE_INDEX] for _, lab in sparse_camvid])
    assert broken.teacher_accuracy == pytest.approx(float((labels == CAMVID_CLASSES.index("Pedestrian")).float().mean()))


def test_a_step_with_nan_gradients_is_skipped_and_the_weights_stay_finite(sparse_camvid):
    """One NaN gradient (injected by a hook on the 3rd backward) would make AdamW's moments,
    then every weight, NaN: the step is skipped instead. A run whose steps all fail stops,
    and a skipped first step does not make torch warn of a scheduler called out of order."""
    from model.training import TrainingDiverged

    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))
    backwards = []

    def poison_third(grad):
        backwards.append(1)
        return grad * float("nan") if len(backwards) == 3 else grad

    model.classifier.weight.register_hook(poison_third)
    config = TrainConfig(steps=12, batch_size=2, crop_size=(90, 120), seed=0)
    result = train(model, sparse_camvid, config)
    assert result.nonfinite_steps == 1 and result.steps == 11 and len(result.losses) == 11
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in result.memory_bank.features)

    broken = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES)))
    broken.classifier.weight.register_hook(lambda grad: grad * float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingDiverged, match="SEGAL_TRAIN_PRECISION=fp32"):
            train(broken, sparse_camvid, config)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]


def test_bf16_channels_last_weight_gradients_of_the_dilated_convolutions_are_right():
    """oneDNN's bf16 channels-last weight gradient of a dilated depthwise convolution is wrong
    on this torch (off by more than its size); training runs those layers in fp32. Each
    such layer of the default network, laid out as train() lays it out, against an fp32
    contiguous copy on the same input and output gradient."""
    from model.precision import bf16_is_native
    from model.training import dilated_depthwise_in_fp32

    if not bf16_is_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX)")
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES))).train()
    model.to(memory_format=torch.channels_last)
    handles = dilated_depthwise_in_fp32(model, "bf16", torch.channels_last, torch.device("cpu"))
    dilated = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
               and max(m.dilation) > 1]  # fmt: skip
    assert len(handles) == len(dilated) >= 4  # DeepLabV3+ dilates the encoder's last stages (and ASPP)
    for conv in dilated:
        inputs = torch.randn(2, conv.in_channels, 23, 30).contiguous(memory_format=torch.channels_last)
        upstream = torch.randn(2, conv.out_channels, 23, 30).contiguous(memory_format=torch.channels_last)
        reference = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    conv.dilation, conv.groups, bias=False)  # fmt: skip
        reference.weight.data.copy_(conv.weight.data)
        reference(inputs.contiguous()).backward(upstream.contiguous())
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = conv(inputs)
        output.backward(upstream.to(output.dtype))
        error = float((conv.weight.grad - reference.weight.grad).abs().max() / reference.weight.grad.abs().max())
        assert error < 0.05, (conv, error)
    for handle in handles:
        handle.remove()
    assert all("forward" not in conv.__dict__ for conv in dilated)  # the class's forward again
