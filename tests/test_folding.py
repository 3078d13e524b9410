"""BatchNorm folding for serving (model.folding) on the real default network."""

import torch
from torch import nn

from model.folding import fold_batch_norms
from model.mc_dropout import mc_moments
from model.network import ModelConfig, build_model


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_folded_network_predicts_what_the_trained_one_does_and_the_original_stays_trainable():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=11, encoder_weights="packaged"))
    with torch.no_grad():  # statistics as a training run leaves them, so that folding changes weights
        for norm in _batch_norms(model):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    folded = fold_batch_norms(model)
    assert folded is not model
    # the encoder's and decoder's BatchNorms are gone; the projection head keeps its own (at_cells reads it)
    assert _batch_norms(folded) == [folded.projection.layers[1]]
    assert len(_batch_norms(model)) > 50
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    image = torch.rand(1, 3, 120, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(image), model(image), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.embed(folded.features(image)), model.embed(model.features(image)))
    moments = [mc_moments(m, image[0], 8, generator=torch.Generator().manual_seed(2))[0] for m in (model, folded)]
    torch.testing.assert_close(moments[1].mean, moments[0].mean, rtol=1e-4, atol=1e-5)
    model.train()  # the original still trains: its BatchNorms update their statistics
    model(torch.cat([image, image.flip(-1)]))
    name, norm = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(norm.running_mean, before[f"{name}.running_mean"])


class _ConvFeedsTwoPaths(nn.Module):
    """A convolution whose raw output is used beside its BatchNorm: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.norm.running_mean.fill_(0.3)
            self.norm.running_var.fill_(4.0)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


def test_a_model_that_folding_would_change_is_served_unfolded(caplog):
    model = _ConvFeedsTwoPaths()
    assert fold_batch_norms(model) is model
    assert "serving the model unfolded" in caplog.text
    assert isinstance(model.norm, nn.BatchNorm2d) and not model.training
