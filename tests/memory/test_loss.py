"""memory_loss equals KL and CE computed by formula from a dense target matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpmem.memory.loss import memory_loss

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

B, V, W = 6, 13, 5


def sparse_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, V)) * 2
    tokens = np.full((B, W), -1, np.int64)
    probs = np.zeros((B, W), np.float32)
    for i in range(B):
        m = [W, 3, 1, 0, 2, 4][i]  # full, padded, one-hot, empty (KL 0), ...
        tokens[i, :m] = rng.choice(V, m, replace=False)
        p = rng.dirichlet(np.ones(m)) if m else np.zeros(0)
        if m >= 2:
            p[-1] = 0.0  # an explicit zero-probability entry: p log p = 0
            p /= p.sum()
        probs[i, :m] = p
    gold = rng.integers(0, V, B)
    return logits, tokens, probs, gold


def dense_reference(logits, tokens, probs, gold, alpha):
    log_q = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # [B, V]
    P = np.zeros((B, V))
    for i in range(B):
        for t, p in zip(tokens[i], probs[i]):
            if t >= 0:
                P[i, t] = p
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P > 0, P * (np.log(P) - log_q), 0.0)
    kl = terms.sum(1).mean()
    ce = -log_q[np.arange(B), gold].mean()
    return alpha * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_loss_matches_dense_formula(alpha):
    logits, tokens, probs, gold = sparse_batch()
    got = memory_loss(torch.tensor(logits), torch.tensor(tokens), torch.tensor(probs), torch.tensor(gold), alpha)
    want = dense_reference(logits, tokens, probs, gold, alpha)
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w, rel=1e-6, abs=1e-7)


def test_gradient_matches_dense_torch():
    logits, tokens, probs, gold = sparse_batch(1)
    x = torch.tensor(logits, requires_grad=True)
    memory_loss(x, torch.tensor(tokens), torch.tensor(probs), torch.tensor(gold), 0.5)[0].backward()
    # dense: d/dlogits [α(−Σ P log q) + (1−α)(−log q_gold)] / B = (softmax − (αP + (1−α)onehot)) / B, P = 0 rows too
    P = np.zeros((B, V))
    for i in range(B):
        for t, p in zip(tokens[i], probs[i]):
            if t >= 0:
                P[i, t] = p
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(V)[gold]
    mass = P.sum(1, keepdims=True)  # 0 for the empty row: its KL term has no gradient
    want = (0.5 * (mass * q - P) + 0.5 * (q - onehot)) / B
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-6, atol=1e-9)


def test_float16_logits_and_int32_targets():
    logits, tokens, probs, gold = sparse_batch(2)
    want = dense_reference(logits.astype(np.float16).astype(np.float64), tokens, probs, gold, 0.5)
    got = memory_loss(
        torch.tensor(logits, dtype=torch.float16),
        torch.tensor(tokens, dtype=torch.int32),
        torch.tensor(probs),
        torch.tensor(gold, dtype=torch.int32),
        0.5,
    )
    assert got[0].item() == pytest.approx(want[0], rel=1e-5)
