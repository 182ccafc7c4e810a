"""Mixed precision: autocast to bf16 or fp16 where the hardware computes in it, and fp16's loss scaling."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Precision:
    """The autocast dtype actually used (None for fp32) and the gradient scaler (enabled for fp16 on CUDA only)."""

    dtype: torch.dtype | None
    device_type: str
    scaler: torch.amp.GradScaler

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":  # from Ampere on; older GPUs (T4, V100) only emulate it, slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # CPU autocast to bf16 runs everywhere, but without native bf16 (AVX512-BF16, AMX) it is slower than fp32
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve(precision: str, device: torch.device) -> Precision:
    """fp32, bf16 or fp16 on `device`; a half precision the device lacks falls back to fp32 with a warning."""
    if precision not in PRECISIONS:
        raise BertkitError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    dtype = None
    if precision == "bf16":
        if _has_bf16(device):
            dtype = torch.bfloat16
        else:
            logger.warning("precision bf16: %s has no native bf16, training in fp32", device)
    elif precision == "fp16":
        # fp16 needs loss scaling to keep small gradients from flushing to zero; GradScaler does it on CUDA only.
        if device.type == "cuda":
            dtype = torch.float16
        else:
            logger.warning("precision fp16: only on CUDA (with loss scaling); %s trains in fp32", device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    return Precision(dtype, device.type, scaler)


def load_scaler(precision: Precision, saved: dict, source) -> None:
    """Restore the fp16 loss scale saved in checkpoint `source`. One saved without loss scaling (fp32, bf16, or fp16
    where it fell back to fp32, on a CPU) holds none, which GradScaler refuses with a RuntimeError: resumed in fp16
    on a GPU, the scale starts afresh instead, as a new run's does, and adapts within a few steps."""
    if saved or not precision.scaler.is_enabled():
        precision.scaler.load_state_dict(saved)
    else:
        logger.warning("%s: saved without fp16 loss scaling; the loss scale starts afresh at %g", source,
                       precision.scaler.get_scale())
