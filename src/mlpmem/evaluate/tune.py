"""Perplexity of mixtures from per-position gold log-probs, and λ / T grids tuned on valid."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from mlpmem.inference.mixing import mix_log_probs


def perplexity(log_probs: np.ndarray) -> float:
    """exp of the mean negative log-likelihood."""
    return float(math.exp(-np.mean(log_probs, dtype=np.float64)))


def mixed_perplexity(components: list[np.ndarray], weights: list[float]) -> float:
    """Perplexity of Σ w_i p_i given each component's log p_i(gold) [N]."""
    mixed = mix_log_probs([torch.from_numpy(np.asarray(c, dtype=np.float64)) for c in components], weights)
    return perplexity(mixed.numpy())


def tune_lambda(lm: np.ndarray, other: np.ndarray, lmbdas: list[float]) -> tuple[float, dict[float, float]]:
    """Best λ for λ·p_other + (1−λ)·p_LM, and the perplexity at every λ."""
    curve = {lmbda: mixed_perplexity([lm, other], [1 - lmbda, lmbda]) for lmbda in lmbdas}
    return min(curve, key=curve.get), curve


def tune_pair(lm: np.ndarray, a: np.ndarray, b: np.ndarray, lmbdas: list[float]) -> tuple[tuple[float, float], float]:
    """Best (λ_a, λ_b) with λ_a + λ_b < 1 for (1−λ_a−λ_b)·p_LM + λ_a·p_a + λ_b·p_b."""
    best, best_ppl = (0.0, 0.0), perplexity(lm)
    for la, lb in itertools.product(lmbdas, lmbdas):
        if la + lb < 1 - 1e-9:
            ppl = mixed_perplexity([lm, a, b], [1 - la - lb, la, lb])
            if ppl < best_ppl:
                best, best_ppl = (la, lb), ppl
    return best, best_ppl
