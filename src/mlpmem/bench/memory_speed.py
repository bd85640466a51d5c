"""The memory's per-token cost, eager and with CPU/GPU speed-ups, and how close each stays to the eager output.

Variants (each a module keys [..., d] -> logits [..., V] that ``MemoryAugmentedLM`` accepts as its memory):
  * ``eager``: the saved ``MLPMemory`` as loaded (float32);
  * ``plain``: the same weights behind a forward without the checks and casts of ``MLPMemory.forward``;
  * ``bf16``: the memory with bfloat16 Linear weights (``mlpmem.memory.quantize``; norms and logits float32);
  * ``int8``: the memory with weight-only int8 Linear weights, one scale per output channel
    (``mlpmem.memory.quantize``): the weights, which a one-token step streams from memory, shrink four-fold;
  * ``compile``: ``torch.compile`` of plain (fused element-wise ops, less Python per call).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mlpmem.systems import MLP_MEMORY


class PlainMemory(nn.Module):
    """An MLPMemory's layers with a bare forward (input cast to the weights' dtype, float32 logits out)."""

    def __init__(self, memory: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        memory = copy.deepcopy(memory).to(dtype)
        self.proj, self.blocks, self.norm, self.head = memory.proj, memory.blocks, memory.norm, memory.head
        self.dtype = dtype

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        x = keys.to(self.dtype)
        if self.proj is not None:
            x = self.proj(x)
        for block in self.blocks:
            x = block(x)  # [..., h]
        return self.head(self.norm(x)).float()  # [..., V]


class ConstantMemory(nn.Module):
    """A memory that costs nothing: fixed logits [V] for every key (isolates the hook + mixing overhead)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.register_buffer("logits", torch.randn(vocab_size))  # a buffer: .to(device) moves it

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*keys.shape[:-1], -1)


def memory_variants(
    memory: nn.Module, names: list[str], device: torch.device
) -> dict[str, tuple[nn.Module | None, str]]:
    """name -> (module or None when unavailable here, note)."""
    out: dict[str, tuple[nn.Module | None, str]] = {
        "eager": (memory, "MLPMemory as saved, float32"),
        "plain": (PlainMemory(memory).to(device), "bare forward, float32"),
    }
    for name in names:
        if name == "bf16":
            out[name] = (MLP_MEMORY.quantize(memory, "bf16"), "bfloat16 Linear weights, float32 norms and logits")
        elif name == "int8":
            out[name] = (MLP_MEMORY.quantize(memory, "int8"), "weight-only int8 Linear, per-output-channel scales")
        elif name == "compile":
            out[name] = (
                torch.compile(PlainMemory(memory).to(device), dynamic=False),
                "torch.compile (inductor) of plain",
            )
    return out


def median_call_ms(
    fn: Callable[[], object], calls: int, warmup: int = 10, sync: Callable[[], None] = lambda: None
) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``calls`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


@torch.inference_mode()
def time_variants(
    memory: nn.Module,
    names: list[str],
    key_dim: int,
    device: torch.device,
    calls: int = 300,
    rounds: int = 6,
    seed: int = 0,
    probe: torch.Tensor | None = None,
) -> list[dict]:
    """Per-token (batch 1) ms of each variant and its fidelity: the largest |Δ log p| against eager float32 and the
    mean KL(eager ‖ variant) over ``probe`` keys [n, d] (the LM's keys of valid tokens; default 256 random keys).
    The first call (compilation) is timed apart; then ``rounds`` rounds visit the variants in turn, ``calls /
    rounds`` calls each, and the median call is reported."""
    g = torch.Generator().manual_seed(seed)
    probe = (probe if probe is not None else torch.randn(256, key_dim, generator=g)).to(device)  # fidelity keys
    one = torch.randn(1, 1, key_dim, generator=g).to(device)  # one decode step's key
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reference = torch.log_softmax(memory(probe).float(), -1)  # [256, V]
    rows, ready = [], {}
    for name, (module, note) in memory_variants(memory, names, device).items():
        row = {"variant": name, "ms_per_token": None, "note": note}
        rows.append(row)
        if module is None:
            continue
        t0 = time.perf_counter()
        try:
            module(one)  # compile happens here
            log_p = torch.log_softmax(module(probe).float(), -1)
        except Exception as err:  # noqa: BLE001  (a back-end missing here: report it, do not abort the benchmark)
            row["note"] = f"{note}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
            continue
        kl = mean_kl(reference, log_p)
        row.update(
            max_abs_log_prob_diff=round(float((reference - log_p).abs().max()), 5),
            mean_kl=float(f"{float(kl):.3g}"),
            first_call_s=round(time.perf_counter() - t0, 3),
            module=module,
        )
        ready[name] = (row, lambda m=module: torch.log_softmax(m(one).float(), -1))
    samples: dict[str, list[float]] = {name: [] for name in ready}
    for _ in range(rounds):
        for name, (_, step) in ready.items():
            samples[name].append(median_call_ms(step, max(1, calls // rounds), warmup=5, sync=sync))
    for name, (row, _) in ready.items():
        row["ms_per_token"] = round(float(np.median(samples[name])), 4)
    return rows


def mean_kl(reference: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_ref ‖ p) from log-probs [n, V]."""
    return (reference.exp() * (reference - log_p)).sum(-1).mean()


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
