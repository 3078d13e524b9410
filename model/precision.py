"""Which floating-point precision a device runs: resolving "auto", and the autocast context.

Training (``model.training``) autocasts its convolutions. Inference autocasts only the
projection head (``model.mc_dropout.mc_moments_and_embeddings``), whose output feeds region
selection; the MC samples may take their masked product in bf16, as deviations from float32
deterministic logits (``model.mc_dropout.LogitChunk``), never the encoder and decoder.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products in hardware (not emulated, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses on `device`: "auto" resolved, and a request the device cannot
    honour (fp16 on CPU, bf16 without hardware support) turned into an error that says so."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "auto":
        if bf16_is_native(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and not bf16_is_native(device):
        raise ValueError(
            f"precision='bf16' needs native bf16 on {device.type} (AVX512-BF16 / AMX CPUs, CUDA compute "
            "capability >= 8.0); use precision='auto' or 'fp32'."
        )
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' is for CUDA (with loss scaling); on a CPU use 'auto', 'bf16' or 'fp32'.")
    return precision


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of a resolved `precision` on `device`; fp32 is a disabled one."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
