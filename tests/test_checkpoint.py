"""Checkpoints: exact round trip, atomic replacement, clear errors for bad files."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest
import torch

from model import ModelConfig, build_model
from model import checkpoint as checkpoint_module
from model.checkpoint import CHECKPOINT_FORMAT_VERSION, load_checkpoint, save_checkpoint

CLASS_NAMES = ["background", "road", "car"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = build_model(ModelConfig(num_classes=3))  # packaged encoder: load must not need it
    with torch.no_grad():  # weights no fresh build reproduces
        for parameter in net.decoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    # Run a train-mode pass so BatchNorm running statistics differ from their init too.
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, 64, 64))
    return net.eval()


def test_round_trip_restores_weights_outputs_and_metadata(model, tmp_path):
    path = tmp_path / "models" / "latest.pt"  # parent folder is created
    extra = {"cycle": 3, "acquisition": "balent", "pixels": [5, 10], "nested": {"miou": 0.5, "ok": True}}
    save_checkpoint(path, model, class_names=CLASS_NAMES, version=7, extra=extra)
    loaded, metadata = load_checkpoint(path)

    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    images = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert not loaded.training

    assert metadata["class_names"] == CLASS_NAMES
    assert metadata["version"] == 7
    assert metadata["extra"] == extra
    assert metadata["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert metadata["model_config"] == model.config.to_dict()
    assert loaded.config == model.config  # the stored config, encoder_weights included
    assert datetime.fromisoformat(metadata["created"]).tzinfo is not None
    probe = tmp_path / "models" / "probe"
    probe.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777  # umask applies, not mkstemp's 0600


def test_load_does_not_read_encoder_weights_again(model, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", model, class_names=CLASS_NAMES, version=0)

    def no_packaged_weights(*args, **kwargs):
        raise AssertionError("load_checkpoint loaded packaged encoder weights")

    monkeypatch.setattr("model.network.load_packaged_weights", no_packaged_weights)
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(model, tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, model, class_names=CLASS_NAMES, version=1)
    good_bytes = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(file.tell() // 2)  # a half-written file, as after a full disk
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_fail)
    changed = build_model(dataclasses.replace(model.config, encoder_weights=None))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, changed, class_names=CLASS_NAMES, version=2)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]
    assert path.read_bytes() == good_bytes
    loaded, metadata = load_checkpoint(path)
    assert metadata["version"] == 1
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_save_replaces_an_existing_checkpoint(model, tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, model, class_names=CLASS_NAMES, version=1)
    save_checkpoint(path, model, class_names=CLASS_NAMES, version=2, extra={"note": "second"})
    _, metadata = load_checkpoint(path)
    assert metadata["version"] == 2 and metadata["extra"] == {"note": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_truncated_foreign_and_missing_files_give_clear_errors(model, tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", model, class_names=CLASS_NAMES, version=1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(truncated)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all\n")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(text)

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a checkpoint written by save_checkpoint"):
        load_checkpoint(other)

    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_weights_and_newer_format_give_clear_errors(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", model, class_names=CLASS_NAMES, version=1)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["num_classes"] = 5
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not fit the stored model config"):
        load_checkpoint(path)
    payload["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="Update the project"):
        load_checkpoint(path)


def test_invalid_metadata_is_refused_before_writing(model, tmp_path):
    path = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(path, model, class_names=["a", "b"], version=1)
    with pytest.raises(ValueError, match="version"):
        save_checkpoint(path, model, class_names=CLASS_NAMES, version="1")
    with pytest.raises(ValueError, match="JSON-compatible"):
        save_checkpoint(path, model, class_names=CLASS_NAMES, version=1, extra={"tensor": torch.zeros(1)})
    assert not path.exists() and list(tmp_path.iterdir()) == []
