"""The cost of the key hooks and the mixing alone: a memory that costs nothing, mixed by the same joint model,
with every call of the mixing timed.

``MixTimer`` is the joint model (``MemoryAugmentedForCausalLM``) with a ``mix`` that notes its own duration; its
decode step minus base's is the hooks + mixing overhead (plus noise), and the time inside ``mix`` is that
overhead measured directly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from mlpmem.bench.memory_speed import ConstantMemory
from mlpmem.inference.generation import MemoryAugmentedLM
from mlpmem.inference.joint import MemoryAugmentedForCausalLM
from mlpmem.measure import Spread, added_ms


class MixTimer(MemoryAugmentedForCausalLM):
    """The joint model recording the seconds of every ``mix`` call in ``seconds``."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.seconds: list[float] = []

    def mix(self, logits: torch.Tensor, keys: dict[str, torch.Tensor]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().mix(logits, keys)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - t0)
        return out


def free_memory_lm(lm: PreTrainedModel, lmbda: float, layer: str) -> MemoryAugmentedLM:
    """The LM with a memory that costs nothing (fixed logits) read from ``layer``, mixed at ``lmbda``, timed
    (``.model.seconds``)."""
    memory = ConstantMemory(int(lm.config.vocab_size)).to(next(lm.parameters()).device)
    return MemoryAugmentedLM(lm, model=MixTimer.from_parts(lm, memory=memory, lmbda=lmbda, memory_layer=layer))


NOTE = (
    "a memory that costs nothing mixed by the same hooks: time inside the mixing hook per step "
    "(log-softmaxes + interpolation; the hooks themselves measured free), and its whole decode step "
    "minus base's (the same cost plus timing noise)"
)


def mixing_overhead(timer: MemoryAugmentedLM, free: Spread, base: Spread, memory_ms: float) -> dict[str, Any]:
    """bench.json's ``mixing_overhead``: median ms inside ``mix``, its share of a memory decode step, and the
    decode step of the free memory minus base's (None when not above the timing noise)."""
    in_hook_ms = float(np.median(timer.model.seconds) * 1e3)
    return {
        "in_hook_ms": round(in_hook_ms, 4),
        "share_of_memory_step": round(in_hook_ms / memory_ms, 4),
        "step_difference_ms": added_ms(free, base),
        "note": NOTE,
    }
