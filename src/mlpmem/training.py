"""What every training stage shares: AdamW, the warm-up + linear-decay schedule, checkpoint cadence, NaN guard.

optimizer = make_optimizer(model, lr, weight_decay)
scheduler = make_scheduler(optimizer, warmup_steps, total_steps, min_lr_ratio)
...
check_finite(loss, step, "train-lm")
if checkpoint_due(step, eval_interval, total_steps): ...
"""

from __future__ import annotations

import math

import torch

from mlpmem.errors import UsageError


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then linear decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - min_ratio) * progress


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The one learning-rate schedule (``lr_factor``) as a torch scheduler: call ``step()`` after each update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio))


def checkpoint_due(step: int, interval: int, total_steps: int) -> bool:
    """Checkpoint (and validate) every ``interval`` steps and after the last one, so a kill after the final
    update resumes at the end instead of retraining."""
    return step % interval == 0 or step == total_steps


def check_finite(loss: torch.Tensor, step: int, stage: str) -> None:
    """Stop a diverged training (nan/inf loss) before anything is saved as complete."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise UsageError(
            f"{stage} diverged at step {step}: the loss is {value} "
            "(lower --lr or --weight-decay, or raise --warmup-steps); nothing was marked complete"
        )


def check_weights_finite(model: torch.nn.Module, stage: str) -> None:
    """Refuse to save weights holding nan/inf."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UsageError(
                f"{stage}: parameter {name} holds nan/inf after training (lower --lr or --weight-decay); "
                "nothing was saved"
            )


def safe_exp(x: float) -> float:
    """exp for perplexities that may overflow (an untrained or diverging model)."""
    return math.exp(x) if x < 700 else math.inf
