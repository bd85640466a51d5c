"""Perplexity of mixtures from per-position gold log-probs, and λ / T grids tuned on valid.

Ties (perplexities equal to 12 significant digits, so float rounding in the mixing cannot decide) go to the
smaller weight on what is mixed into the LM, then to the earlier T of the grid: with nothing to gain, the LM is
changed least. NaN never wins.
"""

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


def rank(ppl: float) -> tuple[bool, float]:
    """Sort key of a perplexity: NaN last, then the value to 12 significant digits."""
    return (math.isnan(ppl), float(f"{ppl:.12g}"))


def _best(curve: dict) -> object:
    """The key of the lowest perplexity; ties to the smallest key."""
    return min(curve, key=lambda x: (*rank(curve[x]), x))


def tune_lambda(lm: np.ndarray, other: np.ndarray, lmbdas: list[float]) -> tuple[float, dict[float, float]]:
    """Best λ for λ·p_other + (1−λ)·p_LM, and the perplexity at every λ."""
    curve = {lmbda: mixed_perplexity([lm, other], [1 - lmbda, lmbda]) for lmbda in lmbdas}
    return _best(curve), curve


def tune_knn(
    lm: np.ndarray, knn: np.ndarray, temperatures: list[float], lmbdas: list[float]
) -> tuple[int, float, dict[float, float]]:
    """Best (T, λ) for kNN-LM given log p_kNN(gold) [N, len(temperatures)]: (index of T, λ, the λ curve at that T)."""
    best = None
    for t in range(len(temperatures)):
        lmbda, curve = tune_lambda(lm, knn[:, t], lmbdas)
        key = (*rank(curve[lmbda]), lmbda, t)
        if best is None or key < best[0]:
            best = (key, t, lmbda, curve)
    _, t, lmbda, curve = best
    return t, lmbda, curve


def tune_pair(lm: np.ndarray, a: np.ndarray, b: np.ndarray, lmbdas: list[float]) -> tuple[tuple[float, float], float]:
    """Best (λ_a, λ_b) with λ_a + λ_b < 1 for (1−λ_a−λ_b)·p_LM + λ_a·p_a + λ_b·p_b, and its perplexity.

    (0, 0), the LM alone, stands when no pair on the grid beats it; ties go to the smaller λ_a + λ_b, then λ_a.
    """
    curve = {(0.0, 0.0): perplexity(lm)}
    for la, lb in itertools.product(lmbdas, lmbdas):
        if la + lb < 1 - 1e-9:
            curve[(la, lb)] = mixed_perplexity([lm, a, b], [1 - la - lb, la, lb])
    best = min(curve, key=lambda p: (*rank(curve[p]), p[0] + p[1], p[0]))
    return best, curve[best]
