"""p_kNN against the formula, written out with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlpmem.knn.distribution import knn_log_prob_of, knn_log_probs_dense, neighbour_values, sparse_distribution

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def reference(dists, vals, temperature):
    """{token: probability} per row, from the formula (missing neighbours: value -1)."""
    rows = []
    for d_row, v_row in zip(dists, vals):
        pairs = [(float(d), int(v)) for d, v in zip(d_row, v_row) if v >= 0]
        if not pairs:
            rows.append({})
            continue
        m = max(-d / temperature for d, _ in pairs)
        z = sum(math.exp(-d / temperature - m) for d, _ in pairs)
        p = {}
        for d, v in pairs:
            p[v] = p.get(v, 0.0) + math.exp(-d / temperature - m) / z
        rows.append(p)
    return rows


def sample(q=40, k=9, vocab=7, seed=0):
    rng = np.random.default_rng(seed)
    dists = np.sort(rng.uniform(0, 30, (q, k)), axis=1).astype(np.float32)
    vals = rng.integers(0, vocab, (q, k))
    vals[rng.random((q, k)) < 0.1] = -1  # missing neighbours
    vals[0] = -1  # a row with no neighbour at all
    dists[vals < 0] = np.float32(3.4e38)  # FAISS's distance for a missing neighbour
    return dists, vals


def test_neighbour_values_maps_missing_ids():
    values = np.array([5, 6, 7], dtype=np.int32)
    assert neighbour_values(values, np.array([[2, -1, 0]])).tolist() == [[7, -1, 5]]


def test_log_prob_of_gold_matches_formula():
    dists, vals = sample()
    gold = np.random.default_rng(1).integers(0, 7, len(vals))
    got = knn_log_prob_of(dists, vals, gold, temperature=4.0)
    for row, g, lp in zip(reference(dists, vals, 4.0), gold, got.tolist()):
        expected = math.log(row[g]) if g in row else float("-inf")
        assert lp == expected or abs(lp - expected) < 1e-5


def test_dense_matches_formula():
    dists, vals = sample()
    got = knn_log_probs_dense(dists, vals, temperature=4.0, vocab_size=9).exp()
    expected = torch.zeros(len(vals), 9)
    for i, row in enumerate(reference(dists, vals, 4.0)):
        for v, p in row.items():
            expected[i, v] = p
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sparse_matches_formula_sorted_truncated_renormalised():
    dists, vals = sample()
    for width in (3, 9, 12):
        tokens, probs = sparse_distribution(dists, vals, temperature=4.0, width=width)
        assert tokens.shape == probs.shape == (len(vals), width)
        assert tokens.dtype == np.int32 and probs.dtype == np.float32
        for i, row in enumerate(reference(dists, vals, 4.0)):
            top = sorted(row.items(), key=lambda tp: (-tp[1], tp[0]))[:width]
            total = sum(p for _, p in top)
            n = len(top)
            assert tokens[i, :n].tolist() == [t for t, _ in top]
            np.testing.assert_allclose(probs[i, :n], [p / total for _, p in top], rtol=1e-5, atol=1e-7)
            assert (tokens[i, n:] == -1).all() and (probs[i, n:] == 0).all()
    assert (tokens[0] == -1).all()  # no neighbour: all padding


def test_sparse_accepts_torch_and_breaks_ties_by_token():
    dists = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    vals = torch.tensor([[9, 2, 9, 2]])
    tokens, probs = sparse_distribution(dists, vals, temperature=1.0, width=2)
    assert tokens.tolist() == [[2, 9]]
    np.testing.assert_allclose(probs, [[0.5, 0.5]])
