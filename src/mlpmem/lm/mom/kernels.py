"""The gated delta rule on the flash-linear-attention library's Triton kernels when they can run, else the plain
PyTorch forms of ``rule``; the same arguments, returns and arithmetic either way.

The library (``pip install mlpmem[fla]``, GPU only) is imported only for CUDA tensors, so CPU use never loads it.
Its conventions match ``rule``'s: inputs [B, T, H, d], decay given as log a_t (natural log: its ``g``), state
[B, H, dk, dv] with keys on the rows, the output read from the updated state. Our query arrives normalised and
scaled, so the kernels get ``scale=1``. ``chunk_gated_delta_rule`` (training; chunks of 16, 32 or 64 tokens) and
``fused_recurrent_gated_delta_rule`` (decoding) stand in for ``rule.chunked`` and ``rule.recurrent``.
float64 inputs and other chunk sizes keep the plain path; the recurrent kernel has no backward, so a per-token call
that needs gradients runs the chunk kernel (the same computation).
"""

from __future__ import annotations

import importlib.util
import logging
from functools import cache

import torch

from mlpmem.lm.mom import rule

log = logging.getLogger(__name__)

FLA_CHUNK_SIZES = (16, 32, 64)


@cache
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def use_fla(x: torch.Tensor) -> bool:
    """True when the library's kernels can take ``x``: a CUDA tensor, not float64, and the library installed."""
    return x.is_cuda and x.dtype != torch.float64 and fla_installed()


@cache
def fla_backward_refused() -> bool:
    """True where the library refuses its own gated chunk backward: Hopper GPUs with Triton >= 3.4.0 and < 3.7.1
    and no tilelang (fla issue #640: that Triton computes it wrongly there; fla raises in the backward pass).
    Training there takes the plain rule; inference keeps the kernels."""
    from fla import utils

    broken = utils.IS_NVIDIA_HOPPER and utils.TRITON_ABOVE_3_4_0 and not utils.TRITON_ABOVE_3_7_1
    if broken and importlib.util.find_spec("tilelang") is None:
        log.warning(
            "flash-linear-attention refuses its gated backward kernel on this GPU with Triton < 3.7.1 (fla #640): "
            "training uses the plain PyTorch rule (upgrade Triton to >= 3.7.1 or install tilelang for the kernels)"
        )
        return True
    return False


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    recurrent: bool,
    chunk_size: int = 64,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rule.recurrent`` (``recurrent``) or ``rule.chunked``, on the library's kernels where ``kernel`` is "auto"
    and they can run. q, k: [B, T, H, dk]; v: [B, T, H, dv]; log_a, beta: [B, T, H]; state [B, H, dk, dv] | None.
    Returns (o [B, T, H, dv], final state [B, H, dk, dv] float32)."""
    if kernel == "auto" and use_fla(v) and (recurrent or chunk_size in FLA_CHUNK_SIZES):
        if not (needs_grad(q, k, v, log_a, beta, state) and fla_backward_refused()):
            return _fla(q, k, v, log_a, beta, state, recurrent, chunk_size)
    if recurrent:
        return rule.recurrent(q, k, v, log_a, beta, state)
    return rule.chunked(q, k, v, log_a, beta, state, chunk_size)


def _fla(q, k, v, log_a, beta, state, recurrent: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    q, k, v = (x.to(v.dtype).contiguous() for x in (q, k, v))
    log_a, beta = log_a.float().contiguous(), beta.to(v.dtype).contiguous()
    state = state.float().contiguous() if state is not None else None
    common = dict(scale=1.0, initial_state=state, output_final_state=True)
    # the fused recurrent kernel has no backward: training takes the chunk one
    if recurrent and not needs_grad(q, k, v, beta, state):
        o, final = fused_recurrent_gated_delta_rule(q, k, v, g=log_a, beta=beta, **common)
    else:
        size = chunk_size if chunk_size in FLA_CHUNK_SIZES else 64
        o, final = chunk_gated_delta_rule(q, k, v, log_a, beta, chunk_size=size, **common)
    return o, final
