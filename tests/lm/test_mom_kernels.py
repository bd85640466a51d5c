"""The flash-linear-attention kernels against the plain PyTorch gated delta rule (GPU only; skipped elsewhere).

PYTHONPATH=src python -m pytest -q tests/lm/test_mom_kernels.py
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from mlpmem.lm.mom import kernels, rule
from mlpmem.lm.mom.layer import MoMConfig, MoMLayer

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
    reason="needs CUDA and the flash-linear-attention library (pip install mlpmem[fla])",
)
TOL = 5e-3  # relative (Frobenius) error: the kernels may use TF32 matrix products


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)) < TOL


def cuda_inputs(B=2, T=150, H=3, dk=32, dv=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda")
    q = rand(B, T, H, dk) / dk**0.5  # [B, T, H, dk]
    k = F.normalize(rand(B, T, H, dk), dim=-1)  # [B, T, H, dk]
    v = rand(B, T, H, dv)  # [B, T, H, dv]
    log_a = -torch.rand(B, T, H, generator=g, device="cuda") * 0.2  # [B, T, H]
    beta = torch.rand(B, T, H, generator=g, device="cuda")  # [B, T, H]
    skip = torch.rand(B, T, H, generator=g, device="cuda") < 0.3  # tokens that leave a memory unchanged
    log_a, beta = log_a.masked_fill(skip, 0.0), beta.masked_fill(skip, 0.0)
    state = rand(B, H, dk, dv)  # [B, H, dk, dv]
    return q, k, v, log_a, beta, state


def test_cpu_takes_the_plain_rule_and_never_loads_the_library():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 4, generator=g) for _ in range(3))
    log_a, beta = -torch.rand(2, 9, 3, generator=g), torch.rand(2, 9, 3, generator=g)
    for recurrent in (False, True):
        o, s = kernels.gated_delta_rule(q, k, v, log_a, beta, None, recurrent=recurrent, chunk_size=4)
        o_ref, s_ref = (rule.recurrent if recurrent else lambda *a: rule.chunked(*a, chunk_size=4))(
            q, k, v, log_a, beta, None
        )
        assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    MoMLayer(MoMConfig(16, num_heads=2, head_k_dim=4, head_v_dim=4))(torch.randn(1, 5, 16))
    assert "fla" not in sys.modules


@needs_gpu
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_kernel_equals_plain_chunked_values_and_gradients(chunk_size):
    with torch.no_grad():  # the forward kernel runs on every GPU
        o, s = kernels.gated_delta_rule(*cuda_inputs(), recurrent=False, chunk_size=chunk_size)
        o_ref, s_ref = rule.chunked(*cuda_inputs(), chunk_size=chunk_size)
        assert close(o, o_ref) and close(s, s_ref)
    inputs = [x.requires_grad_() for x in cuda_inputs()]
    o_ref, s_ref = rule.chunked(*inputs, chunk_size=chunk_size)
    o, s = kernels.gated_delta_rule(*inputs, recurrent=False, chunk_size=chunk_size)
    if kernels.fla_backward_refused():  # Hopper with Triton < 3.7.1: training falls back to the plain rule
        assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
        pytest.skip("flash-linear-attention refuses its gated backward here (Triton < 3.7.1 on Hopper, fla #640)")
    assert close(o, o_ref) and close(s, s_ref)
    weight = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad((o_ref * weight).sum() + s_ref.sum(), inputs)
    grads = torch.autograd.grad((o * weight).sum() + s.sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        assert close(g, g_ref)


@needs_gpu
@torch.no_grad()
def test_recurrent_kernel_equals_plain_recurrent():
    inputs = cuda_inputs(T=7)
    o_ref, s_ref = rule.recurrent(*inputs)
    o, s = kernels.gated_delta_rule(*inputs, recurrent=True)
    assert close(o, o_ref) and close(s, s_ref)


@needs_gpu
@pytest.mark.parametrize("gated_deltanet", [False, True])
def test_layer_on_kernels_equals_plain_layer_and_decodes_the_same(gated_deltanet):
    torch.manual_seed(0)
    sizes = dict(num_heads=2, head_k_dim=16, head_v_dim=16, chunk_size=32)
    c = MoMConfig.gated_deltanet(64, **sizes) if gated_deltanet else MoMConfig(64, **sizes)
    layer = MoMLayer(c).cuda()
    x = torch.randn(2, 70, 64, device="cuda")  # [B, T, D]
    ref, out = layer(x, kernel="plain"), layer(x)
    assert close(out.hidden, ref.hidden) and close(out.state.memory, ref.state.memory)
    with torch.no_grad():
        prefix = layer(x[:, :60])
        state, steps = prefix.state, []
        for t in range(60, 70):
            step = layer(x[:, t : t + 1], state=state)  # T == 1: the fused recurrent kernel
            state = step.state
            steps.append(step.hidden)
    assert close(torch.cat([prefix.hidden] + steps, 1), ref.hidden.detach())
