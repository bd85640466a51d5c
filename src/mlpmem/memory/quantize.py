"""Low-precision memory weights for inference: bf16, or weight-only int8 with one scale per output channel.

    from mlpmem.memory.quantize import quantize_memory
    fast = quantize_memory(memory, "int8")        # a new MLPMemory; memory itself is left as it was
    fast.save_pretrained("m8")                     # config.weight_dtype = "int8": loads back as int8

At batch 1 a decode step reads every weight of the memory once, so its time follows the weights' bytes. Only the
Linear layers change (input projection, the blocks' FFNs, the vocab head); norms, residual stream and logits stay
float32. int8: w ≈ scale[o] · q[o, i] with q = round(w / scale) in [-127, 127], scale[o] = max_i |w[o, i]| / 127.
On CPUs the product runs in PyTorch's own weight-only int8 kernel (``aten._weight_int8pack_mm``, bf16 activations
in; 1.0 ms against 3.4 ms for fp32 on an 8192 x 256 head, one thread, AVX2 and AVX-512 alike); elsewhere (and for
input widths the CPU kernel does not take) the int8 weights are widened to bf16 on the fly. torchao 0.18's
``Int8WeightOnlyConfig`` (the maintained library for this) took 4.7 ms on the same head with torch 2.13 on this CPU,
slower than fp32, so it is not used.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

MemoryDType = Literal["fp32", "bf16", "int8"]
# the CPU kernel crashes (torch 2.13) on input widths that are not a multiple of 16, and on unaligned tensors
KERNEL_K_MULTIPLE, ALIGN = 16, 64
WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}  # flag value -> config.weight_dtype


class Int8Linear(nn.Module):
    """y = (x @ q.T) · scale + bias with int8 weights ``weight`` [out, in] and float32 ``scale`` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # [out, in]
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [out]
        out = cls(linear.in_features, linear.out_features, linear.bias is not None).to(w.device)
        out.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        out.scale.copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach().float())
        return out

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the int8 one stands for [out, in]."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [n, in]
        if x.device.type == "cpu" and self.in_features % KERNEL_K_MULTIPLE == 0:
            if self.weight.data_ptr() % ALIGN:  # loaded from a memory-mapped file at an odd offset
                self.weight = self.weight.clone()
            x = x.clone() if x.data_ptr() % ALIGN else x
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale.to(torch.bfloat16))  # [n, out]
        else:
            y = F.linear(x, self.weight.to(torch.bfloat16)) * self.scale.to(torch.bfloat16)
        y = y.float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class BF16Linear(nn.Linear):
    """An nn.Linear holding bfloat16 weights: bf16 product, float32 in and out."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias, dtype=torch.bfloat16)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None).to(linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


LOW_PRECISION = {"bfloat16": BF16Linear, "int8": Int8Linear}


def swap_linears(module: nn.Module, weight_dtype: str, convert: bool) -> None:
    """Replace every nn.Linear under ``module`` by its ``weight_dtype`` version: converted from the float weights
    (``convert``), or empty, to be filled by loading a saved low-precision memory."""
    cls = LOW_PRECISION[weight_dtype]
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, BF16Linear):
            new = (
                cls.from_linear(child)
                if convert
                else cls(child.in_features, child.out_features, child.bias is not None)
            )
            setattr(module, name, new)
        else:
            swap_linears(child, weight_dtype, convert)


def quantize_memory(memory: nn.Module, dtype: MemoryDType) -> nn.Module:
    """A copy of a float32 ``MLPMemory`` with ``dtype`` Linear weights (``fp32``: the memory itself), recording
    ``config.weight_dtype`` so that ``save_pretrained`` / ``from_pretrained`` keep it."""
    weight_dtype = WEIGHT_DTYPES[dtype]
    current = getattr(memory.config, "weight_dtype", "float32")
    if weight_dtype == current:
        return memory
    if current != "float32":
        raise ValueError(f"the memory already holds {current} weights; quantise its float32 version")
    out = copy.deepcopy(memory)
    swap_linears(out, weight_dtype, convert=True)
    out.config.weight_dtype = weight_dtype
    return out.eval()
