"""THE forward core: sliding windows -> the frozen LM -> scored positions -> keys and/or gold log-probs.

Datastore extraction, online memory keys and perplexity scoring all run the LM through ``forward_windows``, so
a key is computed the same way wherever it is used.

    for out in forward_windows(model, tokens, windows, batch_size=8, key_layers=[layer], log_probs=True):
        out.positions   # [n] int64: position p (datastore entry p), predicting token p + 1
        out.gold        # [n] int64: the token at p + 1
        out.log_probs   # [n] float32: log p_LM(gold) (None unless asked)
        out.keys[layer] # [n, d]: the layer's output at p, in the model's dtype

Windows are grouped by length (all full length but the tail), so no padding or attention mask is needed. When
no log-probs are asked for and every key layer lies inside the backbone, only the backbone runs (the vocab head,
often the largest matrix, is skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from mlpmem.data.tokens import check_token_ids, source_of
from mlpmem.data.windows import Window
from mlpmem.lm.keys import KeyHook, key_module_path


@dataclass
class ScoredPositions:
    """What one batch of windows gives: the positions they score, their gold tokens, log-probs and keys."""

    positions: np.ndarray  # [n] int64
    gold: torch.Tensor  # [n] int64
    log_probs: torch.Tensor | None = None  # [n] float32
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [n, d]


def batches_of_equal_length(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped by length, at most ``batch_size`` each."""
    groups: list[list[Window]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0].end - groups[-1][0].begin) == (w.end - w.begin):
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def runner_for(model: PreTrainedModel, key_layers: Sequence[str], log_probs: bool) -> torch.nn.Module:
    """The module to call: the backbone when no log-probs are needed and every key layer lies inside it."""
    backbone = getattr(model, "base_model", model)
    prefix = f"{model.base_model_prefix}."
    if log_probs or backbone is model or not key_layers or not all(layer.startswith(prefix) for layer in key_layers):
        return model
    return backbone


def forward_windows(
    model: PreTrainedModel,
    tokens: np.ndarray,
    windows: Sequence[Window],
    batch_size: int,
    key_layers: Sequence[str] = (),
    log_probs: bool = False,
    device: torch.device | None = None,
) -> Iterator[ScoredPositions]:
    """Run ``model`` over ``windows`` of ``tokens`` [n_tokens] and yield the scored positions of each batch.

    Each batch's ids are checked against the model's vocabulary (UsageError naming the token file)."""
    device = device or next(model.parameters()).device
    vocab_size, source = model.config.vocab_size, source_of(tokens)
    layers = [key_module_path(model, layer) for layer in dict.fromkeys(key_layers)]
    runner = runner_for(model, layers, log_probs)
    hooks = [KeyHook(model, layer) for layer in layers]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for hook in hooks:
            stack.enter_context(hook)
        for group in batches_of_equal_length(windows, batch_size):
            x = torch.from_numpy(
                np.stack([np.asarray(tokens[w.begin : w.end], dtype=np.int64) for w in group])
            )  # [B, L]
            check_token_ids(x, vocab_size, source)
            out = runner(input_ids=x.to(device), use_cache=False)
            rows = [slice(w.first_scored - w.begin, w.end - 1 - w.begin) for w in group]  # scored positions per row
            gold = torch.cat([x[j, r.start + 1 : r.stop + 1] for j, r in enumerate(rows)])  # [n]
            positions = np.concatenate([np.arange(w.first_scored, w.end - 1) for w in group])
            scored = ScoredPositions(positions, gold)
            if log_probs:
                logits = out.logits  # [B, L, V]
                picked = torch.cat([logits[j, r] for j, r in enumerate(rows)]).float()  # [n, V]
                scored.log_probs = torch.log_softmax(picked, dim=-1).gather(-1, gold.to(picked.device)[:, None])[:, 0]
            for layer, hook in zip(layers, hooks):
                scored.keys[layer] = torch.cat([hook.keys[j, r] for j, r in enumerate(rows)])  # [n, d]
            yield scored
