"""Perplexity of mixtures from per-position gold log-probs, and λ / T grids tuned on valid.

A λ grid is a start: while the best λ sits on an edge of the points searched, the search steps beyond that edge
(by the grid's spacing there, within [0, 1]; kNN-LM's below 1), so a reported optimum is interior unless it is
0 or the top (``on_edge`` tells). The T grid is searched as given (an edge T is flagged by the caller).

Ties (perplexities equal to 12 significant digits, so float rounding in the mixing cannot decide) go to the
smaller weight on what is mixed into the LM, then to the earlier T of the grid: with nothing to gain, the LM is
changed least. NaN never wins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import torch

from mlpmem.inference.mixing import mix_log_probs

MAX_EXTENSIONS = 20  # steps beyond a grid's edges, at most, per search
KNN_TOP = 0.99  # kNN-LM's λ stays below 1: p_kNN is 0 for a token no neighbour holds, which the LM must keep possible


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


def beyond_edges(grid: Iterable[float], chosen: Iterable[float], top: float = 1.0) -> list[float]:
    """New points one step beyond each edge of ``grid`` that a chosen weight sits on, within [0, ``top``]; the
    step is the gap between the edge and its neighbour (0.1 for a one-point grid)."""
    g = sorted(set(grid))
    low_step, high_step = (g[1] - g[0], g[-1] - g[-2]) if len(g) > 1 else (0.1, 0.1)
    new = []
    for x in chosen:
        if x == g[-1] and x < top:
            new.append(min(top, round(x + high_step, 6)))
        if x == g[0] and x > 0:
            new.append(max(0.0, round(x - low_step, 6)))
    return [x for x in dict.fromkeys(new) if x not in g]


def on_edge(grid: Iterable[float], x: float) -> bool:
    """Whether ``x`` is the lowest or highest point searched (after extension: 0 or 1, or the extension limit)."""
    g = sorted(set(grid))
    return x in (g[0], g[-1])


def tune_lambda(
    lm: np.ndarray, other: np.ndarray, lmbdas: list[float], top: float = 1.0
) -> tuple[float, dict[float, float]]:
    """Best λ for λ·p_other + (1−λ)·p_LM, the grid extended beyond an edge optimum (up to ``top``); the perplexity
    at every λ searched."""
    curve: dict[float, float] = {}
    new = list(lmbdas)
    for _ in range(MAX_EXTENSIONS + 1):
        curve |= {lmbda: mixed_perplexity([lm, other], [1 - lmbda, lmbda]) for lmbda in new if lmbda not in curve}
        best = _best(curve)
        new = beyond_edges(curve, [best], top)
        if not new:
            break
    return best, curve


def tune_knn(
    lm: np.ndarray, knn: np.ndarray, temperatures: list[float], lmbdas: list[float]
) -> tuple[int, float, dict[float, float]]:
    """Best (T, λ) for kNN-LM given log p_kNN(gold) [N, len(temperatures)]: (index of T, λ, the λ curve at that T);
    λ at most KNN_TOP."""
    best = None
    for t in range(len(temperatures)):
        lmbda, curve = tune_lambda(lm, knn[:, t], lmbdas, top=KNN_TOP)
        key = (*rank(curve[lmbda]), lmbda, t)
        if best is None or key < best[0]:
            best = (key, t, lmbda, curve)
    _, t, lmbda, curve = best
    return t, lmbda, curve


def tune_pair(
    lm: np.ndarray, a: np.ndarray, b: np.ndarray, lmbdas: list[float]
) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """Best (λ_a, λ_b) with λ_a + λ_b < 1 for (1−λ_a−λ_b)·p_LM + λ_a·p_a + λ_b·p_b, both drawn from one grid that
    is extended beyond an edge either sits on; the perplexity of every pair searched.

    (0, 0), the LM alone, stands when no pair beats it; ties go to the smaller λ_a + λ_b, then λ_a.
    """
    grid, curve = sorted(set(lmbdas)), {(0.0, 0.0): perplexity(lm)}
    for _ in range(MAX_EXTENSIONS + 1):
        for la, lb in itertools.product(grid, grid):
            if la + lb < 1 - 1e-9 and (la, lb) not in curve:
                curve[(la, lb)] = mixed_perplexity([lm, a, b], [1 - la - lb, la, lb])
        best = min(curve, key=lambda p: (*rank(curve[p]), p[0] + p[1], p[0]))
        new = beyond_edges(grid, best) if best != (0.0, 0.0) else []
        if not new:
            break
        grid = sorted(grid + new)
    return best, curve


def pair_on_edge(best: tuple[float, float], curve: dict[tuple[float, float], float]) -> bool:
    """Whether either weight of a tuned pair is the lowest or highest value searched for the pairs (the LM alone,
    (0, 0), is on the edge)."""
    values = {x for pair in curve if pair != (0.0, 0.0) for x in pair}
    return best == (0.0, 0.0) or any(on_edge(values, x) for x in best)
