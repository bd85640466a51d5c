"""The kNN-LM distribution p_kNN(v | q) = Σ_{i: v_i = v} softmax_i(−d_i / T) over squared-L2 distances d_i.

Three views of the same formula, all vectorised over queries (no per-query Python loop):
``knn_log_prob_of`` (log-prob of one gold token, for perplexity), ``knn_log_probs_dense`` ([Q, V] log-probs,
for generation) and ``sparse_distribution`` (the distinct tokens and their probabilities, for targets).

Missing neighbours (FAISS id -1) must carry the value -1 (``neighbour_values`` does this); they are ignored.
"""

from __future__ import annotations

import numpy as np
import torch

from mlpmem.data.tokens import check_token_ids, source_of

ArrayLike = np.ndarray | torch.Tensor


def neighbour_values(values: np.ndarray, ids: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """Values [Q, k] int64 of neighbour ids [Q, k] (ids -1 -> value -1); ``values`` may be a memmap. With
    ``vocab_size``, the values read are checked to be token ids (UsageError naming a memmap's file)."""
    ids = np.asarray(ids)
    found = ids >= 0
    out = np.full(ids.shape, -1, dtype=np.int64)
    out[found] = np.asarray(values[ids[found]], dtype=np.int64)
    check_token_ids(out, vocab_size, source_of(values), lowest=-1)
    return out


def _scores(
    sq_dists: ArrayLike, values: ArrayLike, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-d/T with -inf for missing neighbours [Q, k] float32, values [Q, k] int64, valid mask [Q, k])."""
    d = torch.as_tensor(sq_dists).float()
    v = torch.as_tensor(values).long()
    valid = v >= 0
    scores = torch.where(valid, -d / temperature, torch.full_like(d, float("-inf")))
    return scores, v, valid


def knn_log_prob_of(
    sq_dists: ArrayLike, neighbour_values: ArrayLike, gold: ArrayLike, temperature: float
) -> torch.Tensor:
    """log p_kNN(gold) [Q] float32: logsumexp of -d/T over neighbours whose value is gold, minus the logsumexp
    over all neighbours; -inf when gold is absent (or no neighbour was found)."""
    scores, v, valid = _scores(sq_dists, neighbour_values, temperature)  # [Q, k]
    g = torch.as_tensor(gold).long().to(v.device)[:, None]  # [Q, 1]
    hit = torch.where(valid & (v == g), scores, torch.full_like(scores, float("-inf")))
    total = torch.logsumexp(scores, dim=1)  # [Q]
    out = torch.logsumexp(hit, dim=1) - total
    return torch.where(torch.isfinite(total), out, torch.full_like(out, float("-inf")))


def _probs(scores: torch.Tensor) -> torch.Tensor:
    """softmax over each row's valid neighbours; rows without any give zeros [Q, k]."""
    probs = torch.softmax(scores, dim=1)
    return torch.nan_to_num(probs, nan=0.0)


def knn_log_probs_dense(
    sq_dists: ArrayLike, neighbour_values: ArrayLike, temperature: float, vocab_size: int
) -> torch.Tensor:
    """log p_kNN over the whole vocabulary [Q, V] float32 (tokens no neighbour carries: -inf)."""
    scores, v, valid = _scores(sq_dists, neighbour_values, temperature)
    probs = _probs(scores)  # [Q, k]
    dense = torch.zeros(scores.shape[0], vocab_size, dtype=probs.dtype, device=probs.device)
    dense.scatter_add_(1, torch.where(valid, v, torch.zeros_like(v)), probs)  # missing: weight 0 on token 0
    return dense.log()


def sparse_distribution(
    sq_dists: ArrayLike, neighbour_values: ArrayLike, temperature: float, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct tokens of each row's neighbours and their p_kNN, most probable first.

    Returns tokens int32 [Q, width] (padding -1) and probs float32 [Q, width] (padding 0), truncated to
    ``width`` tokens and renormalised to sum 1 (rows with no neighbour: all padding). Ties are broken by
    token id, so the result is deterministic.
    """
    scores, v, valid = _scores(sq_dists, neighbour_values, temperature)
    probs = _probs(scores)  # [Q, k]
    n_rows, k = probs.shape
    # sort each row by token, then sum the probabilities of equal tokens into their first slot
    sv, order = torch.sort(torch.where(valid, v, torch.full_like(v, -1)), dim=1, stable=True)  # [Q, k]
    sp = torch.gather(probs, 1, order)
    first = torch.ones_like(sv, dtype=torch.bool)
    first[:, 1:] = sv[:, 1:] != sv[:, :-1]
    segment = torch.cumsum(first.long(), dim=1) - 1  # [Q, k] index of the distinct token within its row
    seg_probs = torch.zeros_like(sp).scatter_add_(1, segment, sp)  # [Q, k]
    seg_tokens = torch.full_like(sv, -1).scatter_(1, segment, sv)  # last write per segment: all equal
    dead = (seg_tokens < 0) | (seg_probs <= 0)  # missing neighbours, empty segments, underflowed probabilities
    seg_probs = seg_probs.masked_fill(dead, 0.0)
    seg_tokens = seg_tokens.masked_fill(dead, -1)
    # segments are in ascending token order, so a stable sort on probability alone breaks ties by token id;
    # dead segments (probability 0) go last
    keep = torch.argsort(-seg_probs, dim=1, stable=True)[:, : min(width, k)]  # [Q, w]
    top_p = torch.gather(seg_probs, 1, keep)
    top_t = torch.gather(seg_tokens, 1, keep)
    total = top_p.sum(dim=1, keepdim=True)
    top_p = torch.where(total > 0, top_p / total.clamp_min(torch.finfo(top_p.dtype).tiny), top_p)
    tokens = np.full((n_rows, width), -1, dtype=np.int32)
    out_probs = np.zeros((n_rows, width), dtype=np.float32)
    tokens[:, : top_t.shape[1]] = top_t.cpu().numpy()
    out_probs[:, : top_p.shape[1]] = top_p.cpu().numpy()
    return tokens, out_probs
