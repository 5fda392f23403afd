"""Whether bf16 autocast pays on this device. On a CPU without native bf16 matmuls (no AVX512-BF16 or AMX,
e.g. an AVX2-only EPYC) oneDNN emulates them, and a training step runs about 30x slower than in fp32; the
trainers then train in fp32 and say so, rather than silently taking hours."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def native_bf16(device: torch.device | str) -> bool:
    """True when bf16 matmuls run natively on `device`: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 / AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16_autocast(requested: bool, device: torch.device | str) -> bool:
    """The autocast setting to train with: `requested`, unless this device would emulate bf16 (then fp32 and a
    warning naming the config key)."""
    if requested and not native_bf16(device):
        log.warning("autocast_bf16 requested, but %s has no native bf16 matmuls (no AVX512-BF16/AMX on a CPU): "
                    "training in fp32 instead (set autocast_bf16: false to silence this)", torch.device(device))
        return False
    return requested
