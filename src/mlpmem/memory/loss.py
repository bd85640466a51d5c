"""The memory's training loss: α · KL(p_kNN ‖ p_mem) + (1 − α) · CE(p_mem, gold) (DESIGN.md §1.5).

p_kNN arrives sparse (distinct tokens and their probabilities, padded with token -1 / probability 0), so the
KL is computed by gathering the memory's log-probs at those tokens; no dense [B, V] target is ever built.
"""

from __future__ import annotations

import torch


def memory_loss(
    logits: torch.Tensor,
    target_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    gold: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce), each the mean over the batch.

    logits [B, V] of the memory; target_tokens [B, w] int (pad -1); target_probs [B, w] (pad 0; a row's valid
    entries sum to 1, or it is all padding and contributes KL 0); gold [B] int, the next token.
    KL = Σ_j p_j (log p_j − log q_{t_j}) over valid j (p log p = 0 at p = 0); CE = −log q_gold.
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    valid = target_tokens >= 0  # [B, w]
    log_q_t = log_q.gather(1, target_tokens.clamp(min=0).long())  # [B, w]
    p = torch.where(valid, target_probs.float(), torch.zeros((), device=logits.device))  # [B, w]
    kl = (torch.xlogy(p, p) - p * log_q_t).sum(dim=1).mean()
    ce = -log_q.gather(1, gold.long().unsqueeze(1)).squeeze(1).mean()
    loss = alpha * kl + (1.0 - alpha) * ce
    return loss, kl, ce
