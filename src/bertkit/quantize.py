"""int8 inference on the CPU: dynamic quantization of every linear layer of the encoder and the heads.

Each weight matrix is stored in int8 with one scale per output row; each call quantizes its input to 8 bits from
the range it observes (asymmetric, one scale per call), runs the integer GEMM through PyTorch's int8 kernels and
rescales the int32 sums to float. The kernels are oneDNN's where the CPU has AMX (Intel's tile instructions for int8
matrices: 5.9-8.4x float32 GEMMs on a 2-core Xeon, where PyTorch's default x86 kernels, fbgemm with AVX-512 VNNI,
gave 2.4-2.8x) and the default x86 ones elsewhere; both compute the same sums (benchmarks/RESULTS.md).
Embeddings, LayerNorm, GELU, softmax and attention stay in float32, as does the MLM decoder (the tied embedding
matrix, or an untied decoder's own). The unpadded encoder is kept: the int8 layers run on the packed (N, H) real tokens, and Q, K and V are one
int8 GEMM, as they are one float GEMM in `BertSelfAttention`.

Two choices decide the accuracy, measured on all-MiniLM-L6-v2 (cosine of mean-pooled embeddings to float32's, 32
SST-2 sentences, worst / mean): PyTorch's default dynamic quantization (one scale per matrix, inputs in 7 bits)
0.893 / 0.935; one scale per row 0.943 / 0.972; and with inputs in the full 8 bits 0.986 / 0.992, which is what runs
here. The 8th bit is safe only where the CPU has VNNI, whose dot product adds the 8-bit products straight into 32
bits; without it the AVX2 kernels add pairs of products in 16 bits, which can saturate at full range, so there the
inputs keep 7 bits, as PyTorch's own default does. What the int8 model costs in task accuracy and what it gains in
speed is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from bertkit.errors import BertkitError
from bertkit.model import BertLMPredictionHead, BertSelfAttention


class Int8Linear(nn.Module):
    """y = x W^T + b, W in int8 with one scale per output row, x quantized to int8 per call from its own range."""

    def __init__(self, linear: nn.Linear, reduce_range: bool, engine: str = "x86"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = reduce_range  # inputs in 7 bits instead of 8 (see the module docstring)
        self.engine = engine
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # quantized tensors are deprecated in favour of the torchao package; they still hold the weights of
            # PyTorch's own int8 GEMM, which is what runs here, and torchao is not a dependency
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scales, zero_points, axis=0, dtype=torch.qint8)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        # the engine that packs the weight is the one whose GEMM runs it, whatever the global engine is later
        before, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
        try:
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        finally:
            torch.backends.quantized.engine = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self._packed, reduce_range=self.reduce_range)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, reduce_range={self.reduce_range}, "
                f"engine={self.engine}")


@functools.cache
def cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo ("" elsewhere)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512-VNNI or AVX-VNNI): 8-bit dot products summed in 32 bits."""
    flags = cpu_flags()
    return " avx512_vnni" in flags or " avx_vnni" in flags


def int8_engine() -> str:
    """The quantized engine whose int8 GEMM is fastest here: oneDNN where the CPU has AMX for int8, else x86."""
    if " amx_int8" in cpu_flags() and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return "x86"


def to_int8(model: nn.Module) -> nn.Module:
    """Quantize `model` in place for CPU inference (it is then usable for inference only) and return it.

    `model` is any bertkit model on the CPU; every `nn.Linear` becomes an `Int8Linear`, and each attention's three
    Q, K, V projections one fused `Int8Linear` (`BertSelfAttention.qkv`).
    """
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise BertkitError(f"int8 inference runs on the CPU; the model is on {', '.join(sorted(devices))} "
                           "(expected --device cpu)")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:  # the int8 GEMM takes float32 inputs: a bfloat16 model failed in its first forward
        raise BertkitError(f"int8 quantizes a float32 model; the model holds "
                           f"{', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} (expected model.float())")
    engine = int8_engine()
    if engine not in torch.backends.quantized.supported_engines:
        raise BertkitError(f"this torch build has no int8 CPU kernels (quantized engines: "
                           f"{', '.join(torch.backends.quantized.supported_engines)}); expected {engine}")
    reduce_range = not has_vnni()
    model.eval()
    with torch.no_grad():
        for attention in model.modules():
            if isinstance(attention, BertSelfAttention) and attention.qkv is None:
                weight, bias = attention.fused_qkv()
                fused = nn.Linear(weight.shape[1], weight.shape[0])
                fused.weight.copy_(weight)
                fused.bias.copy_(bias)
                attention.qkv = fused
                del attention.query, attention.key, attention.value  # nothing reads them once qkv is set
                attention._fused = None
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                # an untied masked-LM decoder stays float32, as the tied one (the embeddings) does: its weight is read
                if type(child) is nn.Linear and not (isinstance(parent, BertLMPredictionHead) and name == "decoder"):
                    setattr(parent, name, Int8Linear(child, reduce_range, engine))
    return model
