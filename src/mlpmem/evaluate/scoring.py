"""Sliding-window scoring: log p_LM(gold) at every scored position and, when asked, the keys of any LM layers there.

The per-position gold log-probabilities of each system are all evaluation needs: perplexity of a mixture is
exp(-mean(log Σ_i w_i p_i(gold))), so λ and T are tuned without keeping any full distribution. The LM runs
through the one forward core (``mlpmem.lm.forward``), once per split, collecting the keys of every layer asked
for (the datastore's for kNN-LM, the memory's own) in that same forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from mlpmem.data.windows import sliding_windows
from mlpmem.distributed import contiguous_share
from mlpmem.lm.forward import forward_windows
from mlpmem.progress import progress


@dataclass
class ScoredSplit:
    """One split scored by the LM: gold tokens [N], log p_LM(gold) [N] float32, keys per layer [N, d] float32.

    Keys stay float32, as the LM computes them and as ``generate``, the exported model and lm-eval feed them to the
    memory and the kNN search: one numeric path, so a published row is what the exported model reproduces."""

    gold: np.ndarray
    lm_log_prob: np.ndarray
    keys: dict[str, np.ndarray] = field(default_factory=dict)


@torch.inference_mode()
def score_tokens(
    model: PreTrainedModel,
    tokens: np.ndarray,
    context: int,
    stride: int,
    batch_size: int,
    key_layers: Sequence[str] = (),
    desc: str = "score",
    share: tuple[int, int] = (0, 1),
) -> ScoredSplit:
    """Score ``tokens`` [n] with the sliding-window protocol (``mlpmem.data.windows``) in one pass over the LM;
    keep the keys of each of ``key_layers`` (module paths) at every scored position. ``share`` = (rank, processes):
    score only that rank's contiguous block of windows (blocks in rank order cover every position once)."""
    windows = sliding_windows(len(tokens), context, stride)
    a, b = contiguous_share(len(windows), *share)
    windows = windows[a:b]
    n = sum(w.n_scored for w in windows)
    gold = np.empty(n, dtype=np.int64)
    lm_log_prob = np.empty(n, dtype=np.float32)
    keys: dict[str, np.ndarray] = {}
    pos = 0
    with progress(total=n, desc=desc, unit="tok", unit_scale=True, disable=share[0] != 0) as bar:
        for out in forward_windows(model, tokens, windows, batch_size, key_layers=key_layers, log_probs=True):
            m = len(out.positions)
            gold[pos : pos + m] = out.gold.numpy()
            lm_log_prob[pos : pos + m] = out.log_probs.cpu().numpy()
            for layer, k in out.keys.items():  # [m, d]
                if layer not in keys:
                    keys[layer] = np.empty((n, k.shape[-1]), dtype=np.float32)
                keys[layer][pos : pos + m] = k.float().cpu().numpy()
            pos += m
            bar.update(m)
    return ScoredSplit(gold, lm_log_prob, keys)
