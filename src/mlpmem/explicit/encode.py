"""Sparse explicit memories: run the LM over "<marker> reference" and keep, per memory layer and head, the key and
value of the ``keep`` reference tokens that receive the most attention from the whole reference.

The rank of token j is sum_i exp(q_i . k_j / sqrt(d)) over every token i of the reference, with no causal mask
and no position term (Memory3's approximation of the attention a token receives); q and k are taken after the
position encoding (GPT-2: the learned positions added at the input), so a kept token keeps its position.

    kv = encode_references(lm, refs, marker_ids=[...], memory_layers=[0, 1], keep=8)  # [n, layers, 2, H, keep, d]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from mlpmem.data.tokens import check_token_ids, source_of


def top_tokens(q: torch.Tensor, k: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [H, keep] (ascending) of the keys most attended to: q, k [H, n, d]; rank of j: logsumexp_i q_i.k_j/√d
    (the log of sum_i exp(q_i.k_j/√d), computed without overflow)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # [H, n_i, n_j]
    received = torch.logsumexp(scores, dim=1)  # [H, n_j]
    return torch.topk(received, keep, dim=-1).indices.sort(dim=-1).values


class QKVHook:
    """Captures the query, key and value [B, H, n, d] of one GPT-2 block's attention (output of its ``c_attn``)."""

    def __init__(self, attn: torch.nn.Module):
        self.attn, self.out = attn, None

    def __enter__(self) -> QKVHook:
        self.handle = self.attn.c_attn.register_forward_hook(lambda m, i, o: setattr(self, "out", o))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.out.split(self.attn.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.attn.head_dim)
        return tuple(x.view(shape).transpose(1, 2) for x in (q, k, v))


@torch.no_grad()
def encode_batch(
    lm: PreTrainedModel, refs: torch.Tensor, marker_ids: Sequence[int], memory_layers: Sequence[int], keep: int
) -> torch.Tensor:
    """Memories [B, layers, 2, H, keep, d] of equal-length references ``refs`` [B, n] (n >= keep)."""
    marker = torch.tensor(list(marker_ids), dtype=torch.long, device=refs.device).expand(len(refs), -1)
    x = torch.cat([marker, refs], dim=1)  # [B, m + n]
    blocks = lm.transformer.h
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(QKVHook(blocks[layer].attn)) for layer in memory_layers]
        lm.transformer(input_ids=x, use_cache=False)
        out = []
        for hook in hooks:
            q, k, v = (t[:, :, len(marker_ids) :] for t in hook.qkv())  # [B, H, n, d]: the reference tokens only
            picked = torch.stack([top_tokens(q[b], k[b], keep) for b in range(len(refs))])  # [B, H, keep]
            index = picked[..., None].expand(-1, -1, -1, k.shape[-1])
            out.append(torch.stack([k.gather(2, index), v.gather(2, index)], dim=1))  # [B, 2, H, keep, d]
    return torch.stack(out, dim=1)


def encode_references(
    lm: PreTrainedModel,
    ids: np.ndarray,
    offsets: np.ndarray,
    references: Sequence[int],
    marker_ids: Sequence[int],
    memory_layers: Sequence[int],
    keep: int,
    batch_size: int = 16,
) -> np.ndarray:
    """float16 memories [len(references), layers, 2, H, keep, d] of references given by ``ids``/``offsets``
    (reference r is ids[offsets[r]:offsets[r + 1]]); batches group references of equal length. UsageError naming
    the file of ``ids`` (a memmap) when one lies outside the LM's vocabulary."""
    device = next(lm.parameters()).device
    lengths = offsets[np.asarray(references) + 1] - offsets[np.asarray(references)]
    out: list[np.ndarray | None] = [None] * len(references)
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            x = np.stack([ids[offsets[references[j]] : offsets[references[j] + 1]] for j in batch]).astype(np.int64)
            check_token_ids(x, lm.config.vocab_size, source_of(ids))
            kv = encode_batch(lm, torch.from_numpy(x).to(device), marker_ids, memory_layers, keep)
            for j, memory in zip(batch, kv.float().cpu().numpy().astype(np.float16)):
                out[j] = memory
    return np.stack(out)
