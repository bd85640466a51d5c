"""Low-precision memory weights: int8 codes and scales against a naive per-row computation, outputs against the
dequantised float64 reference, save/load round trips, and the KL to float32 against a loop written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlpmem.bench.memory_speed import mean_kl
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig
from mlpmem.memory.quantize import BF16Linear, Int8Linear, quantize_memory

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def tiny_memory(input_dim: int = 24, hidden: int = 32, blocks: int = 2, vocab: int = 200) -> MLPMemory:
    torch.manual_seed(0)
    config = MLPMemoryConfig(input_dim=input_dim, hidden_size=hidden, n_blocks=blocks, vocab_size=vocab)
    memory = MLPMemory(config).eval()
    with torch.no_grad():  # non-zero biases and norms, so that every parameter matters
        for p in memory.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return memory


def test_int8_codes_and_scales_follow_the_per_row_rule():
    torch.manual_seed(1)
    linear = torch.nn.Linear(40, 7)
    with torch.no_grad():
        linear.weight[3] = 0.0  # an all-zero row keeps a positive scale and zero codes
    q = Int8Linear.from_linear(linear)
    w = linear.weight.detach().double().numpy()
    for o in range(7):
        scale = np.abs(w[o]).max() / 127
        if scale == 0:
            assert (q.weight[o] == 0).all()
            continue
        codes = [max(-127, min(127, round(x / scale))) for x in w[o]]  # round half to even, as torch.round
        assert q.weight[o].tolist() == codes
        assert q.scale[o].item() == pytest.approx(scale, rel=1e-6)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_equals_its_dequantised_weights(bias):
    """y = x @ (q * scale).T + b in float64, up to bf16 activations (relative 2^-8 per product sum)."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48, bias=bias)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 64)
    ref = x.double() @ (q.weight.double() * q.scale.double()[:, None]).T
    if bias:
        ref = ref + linear.bias.detach().double()
    y = q(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    scale = x.double().abs() @ (q.weight.double().abs() * q.scale.double()[:, None]).T  # |x| @ |W|.T
    assert ((y.double() - ref).abs() <= 2 * 2**-8 * scale + 1e-6).all()
    # and the int8 weights stand close to the float ones: half a step per entry at most
    assert (q.dequantized() - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-7


@pytest.mark.parametrize("dtype,cls", [("int8", Int8Linear), ("bf16", BF16Linear)])
def test_quantised_memory_round_trips_through_save_pretrained(tmp_path, dtype, cls):
    memory = tiny_memory()
    fast = quantize_memory(memory, dtype)
    assert fast is not memory and isinstance(fast.head, cls) and isinstance(fast.proj, cls)
    assert type(memory.head) is torch.nn.Linear  # the float32 memory is left as it was
    fast.save_pretrained(tmp_path / "m")
    loaded = MLPMemory.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.weight_dtype == {"int8": "int8", "bf16": "bfloat16"}[dtype]
    assert isinstance(loaded.head, cls) and loaded.norm.weight.dtype == torch.float32
    for (name, a), (_, b) in zip(sorted(fast.state_dict().items()), sorted(loaded.state_dict().items())):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    keys = torch.randn(6, 24)
    with torch.no_grad():
        assert torch.equal(fast(keys), loaded(keys))
    assert quantize_memory(loaded, dtype) is loaded
    with pytest.raises(ValueError, match="already holds"):
        quantize_memory(loaded, "int8" if dtype == "bf16" else "bf16")


def test_int8_memory_is_close_to_float32_and_its_kl_is_the_formula():
    """KL(fp32 ‖ int8) as the benchmark computes it equals a per-row loop over the vocabulary, and stays below the
    1e-3 fidelity bar on this memory."""
    memory = tiny_memory(hidden=64, vocab=300)
    fast = quantize_memory(memory, "int8")
    keys = torch.randn(16, 24)
    with torch.no_grad():
        ref = torch.log_softmax(memory(keys).double(), -1)
        got = torch.log_softmax(fast(keys).double(), -1)
    loop = []
    for r in range(16):
        p = [math.exp(v) for v in ref[r].tolist()]
        loop.append(sum(pi * (a - b) for pi, a, b in zip(p, ref[r].tolist(), got[r].tolist())))
    assert mean_kl(ref, got).item() == pytest.approx(float(np.mean(loop)), rel=1e-9, abs=1e-15)
    assert 0 <= mean_kl(ref, got).item() < 1e-3
