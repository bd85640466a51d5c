"""The one log-space mixing function, used by evaluation, generation and benchmarks alike.

log p = logsumexp_i(log w_i + log p_i); with two components this is
log p = logaddexp(log(1 - λ) + log p_LM, log λ + log p_mem).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mix_log_probs(log_probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Mix distributions given as log-probabilities of equal shape with weights that sum to 1.

    A component with weight 0 is dropped, so λ = 0 returns the LM's log-probs bit for bit.
    """
    if len(log_probs) != len(weights):
        raise ValueError("one weight per component")
    if abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise ValueError(f"mixing weights must be >= 0 and sum to 1, got {list(weights)}")
    kept = [(lp, w) for lp, w in zip(log_probs, weights) if w > 0]
    if len(kept) == 1:
        return kept[0][0]
    # a pairwise logaddexp fold: the same logsumexp without stacking (3x faster on one decode step's [1, 1, V])
    out = kept[0][0] + math.log(kept[0][1])
    for lp, w in kept[1:]:
        out = torch.logaddexp(out, lp + math.log(w))
    return out


def mix_with_lm(lm_log_probs: torch.Tensor, other_log_probs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """p = λ·p_other + (1 − λ)·p_LM in log space."""
    return mix_log_probs([lm_log_probs, other_log_probs], [1.0 - lmbda, lmbda])
