"""Sliding-window scoring: log p_LM(gold) at every scored position, and optionally the key there.

The per-position gold log-probabilities of each system are all evaluation needs: perplexity of a mixture is
exp(-mean(log Σ_i w_i p_i(gold))), so λ and T are tuned without keeping any full distribution.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from mlpmem.data.windows import Window, sliding_windows


@dataclass
class ScoredSplit:
    """One split scored by the LM: gold tokens [N], log p_LM(gold) [N], keys [N, d] (fp16) or None."""

    gold: np.ndarray
    lm_log_prob: np.ndarray
    keys: np.ndarray | None


def batches_of_equal_length(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped by length (all full-length but the tail), at most batch_size each."""
    groups: list[list[Window]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0].end - groups[-1][0].begin) == (w.end - w.begin):
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


@torch.inference_mode()
def score_tokens(
    model: PreTrainedModel,
    tokens: np.ndarray,
    context: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    key_layer: str | None = None,
    desc: str = "score",
) -> ScoredSplit:
    """Score ``tokens`` with the sliding-window protocol; collect keys from ``key_layer`` when given."""
    from mlpmem.lm.keys import KeyHook

    windows = sliding_windows(len(tokens), context, stride)
    n = sum(w.n_scored for w in windows)
    gold = np.empty(n, dtype=np.int64)
    lm_log_prob = np.empty(n, dtype=np.float32)
    keys = None
    hook = KeyHook(model, key_layer) if key_layer else contextlib.nullcontext()
    pos = 0
    with hook, tqdm(total=n, desc=desc, unit="tok", unit_scale=True) as bar:
        for group in batches_of_equal_length(windows, batch_size):
            x = torch.from_numpy(np.stack([tokens[w.begin : w.end].astype(np.int64) for w in group])).to(device)
            logits = model(input_ids=x).logits  # [B, L, V]
            for j, w in enumerate(group):
                lo, hi = w.first_scored - w.begin, w.end - 1 - w.begin
                target = x[j, lo + 1 : hi + 1]  # [n_scored]
                log_probs = torch.log_softmax(logits[j, lo:hi].float(), dim=-1)  # [n_scored, V]
                lm_log_prob[pos : pos + hi - lo] = log_probs.gather(-1, target[:, None])[:, 0].cpu().numpy()
                gold[pos : pos + hi - lo] = target.cpu().numpy()
                if key_layer:
                    k = hook.keys[j, lo:hi]  # [n_scored, d]
                    if keys is None:
                        keys = np.empty((n, k.shape[-1]), dtype=np.float16)
                    keys[pos : pos + hi - lo] = k.float().cpu().numpy()
                pos += hi - lo
            bar.update(sum(w.n_scored for w in group))
    return ScoredSplit(gold, lm_log_prob, keys)


@torch.inference_mode()
def memory_log_prob(memory: torch.nn.Module, keys: np.ndarray, gold: np.ndarray, device: torch.device, batch: int = 4096) -> np.ndarray:
    """log p_mem(gold) [N] from keys [N, d]."""
    out = np.empty(len(gold), dtype=np.float32)
    dtype = next(memory.parameters()).dtype
    for i in tqdm(range(0, len(gold), batch), desc="memory", unit="batch"):
        k = torch.from_numpy(np.asarray(keys[i : i + batch], dtype=np.float32)).to(device, dtype)
        log_probs = torch.log_softmax(memory(k).float(), dim=-1)  # [b, V]
        g = torch.from_numpy(gold[i : i + batch]).to(device)
        out[i : i + batch] = log_probs.gather(-1, g[:, None])[:, 0].cpu().numpy()
    return out


def knn_log_prob(
    index, keys: np.ndarray, gold: np.ndarray, values: np.ndarray, k: int, temperatures: list[float],
    nprobe: int | None = None, stored_keys: np.ndarray | None = None, batch: int = 4096,
) -> np.ndarray:
    """log p_kNN(gold) [N, len(temperatures)]: one search per query, every temperature from its distances.

    ``stored_keys`` (the datastore keys) re-ranks the neighbours with exact distances.
    """
    from mlpmem.knn.distribution import knn_log_prob_of
    from mlpmem.knn.search import rerank_exact, search

    out = np.empty((len(gold), len(temperatures)), dtype=np.float32)
    for i in tqdm(range(0, len(gold), batch), desc="knn", unit="batch"):
        q = np.ascontiguousarray(keys[i : i + batch], dtype=np.float32)
        dists, ids = search(index, q, k, nprobe)
        if stored_keys is not None:
            dists, ids = rerank_exact(q, ids, stored_keys)
        neighbour_values = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)
        for t, temperature in enumerate(temperatures):
            out[i : i + batch, t] = np.asarray(knn_log_prob_of(dists, neighbour_values, gold[i : i + batch], temperature))
    return out
