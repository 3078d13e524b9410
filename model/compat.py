"""Import guard for torchvision builds whose compiled ops do not match torch.

The registry's torchvision 0.28.0 is a CUDA build. Beside the CPU build of torch 2.13.0
its compiled ops fail to load, and `import torchvision` (hence timm, hence smp) dies with
``operator torchvision::nms does not exist``. torchvision's Python side only needs the op
*schemas* to exist at import; smp and timm never call nms/roi_align. So, only when the
ops are missing, we declare the two schemas torchvision's import touches. On a machine
with a matching torchvision the ops exist and this does nothing.
"""

from __future__ import annotations

import torch

_fragment: torch.library.Library | None = None  # kept alive: the schemas live as long as it does


def _torchvision_ops_missing() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup raises when the op is absent
    except (AttributeError, RuntimeError):
        return True
    return False


def ensure_torchvision_importable() -> None:
    """Make `import torchvision` work; call before importing timm or smp."""
    global _fragment
    if _fragment is not None:
        return
    try:
        import torchvision  # noqa: F401 - a matching build loads its own ops here
    except RuntimeError:
        pass
    if not _torchvision_ops_missing():
        return
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
