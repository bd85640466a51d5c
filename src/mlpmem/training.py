"""What every training stage shares: AdamW, the warm-up + linear-decay schedule, checkpoint cadence, NaN guard,
and the metrics file.

optimizer = make_optimizer(model, lr, weight_decay)
scheduler = make_scheduler(optimizer, warmup_steps, total_steps, min_lr_ratio)
metrics = MetricsLog(build.dir, step)
...
check_finite(loss, step, "train-lm")
if metrics_due(step, eval_interval, total_steps): metrics.write(step, {"train/loss": ..., "train/lr": ...})
if checkpoint_due(step, eval_interval, total_steps): ...
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mlpmem.artifacts import METRICS, atomic_write_bytes
from mlpmem.errors import UsageError

METRICS_EVERY = 10  # steps between training lines of metrics.jsonl (checkpoint steps and the last step too)


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


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter holding nan/inf, or None."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            return name
    return None


def check_weights_finite(model: torch.nn.Module, stage: str) -> None:
    """Refuse to save weights holding nan/inf."""
    if (name := non_finite_parameter(model)) is not None:
        raise UsageError(
            f"{stage}: parameter {name} holds nan/inf after training (lower --lr or --weight-decay); nothing was saved"
        )


def safe_exp(x: float) -> float:
    """exp for perplexities that may overflow (an untrained or diverging model)."""
    return math.exp(x) if x < 700 else math.inf


def metrics_due(step: int, interval: int, total_steps: int) -> bool:
    """A training line in metrics.jsonl every METRICS_EVERY steps, at every checkpoint and after the last step."""
    return step % METRICS_EVERY == 0 or checkpoint_due(step, interval, total_steps)


class StepWindow:
    """Loss and time summed over the steps since the last metrics line: their means for the next line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds, self.units = 0, 0.0, 0

    def add(self, seconds: float, units: int, **losses: float) -> None:
        """One step: its duration, what it processed (tokens, keys) and its losses."""
        self.steps, self.seconds, self.units = self.steps + 1, self.seconds + seconds, self.units + units
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def line(self, lr: float, rate_name: str) -> dict[str, float]:
        """``train/NAME`` means, ``train/lr`` and ``train/RATE_NAME`` (units per second); then starts over."""
        out = {f"train/{k}": v / max(1, self.steps) for k, v in self.sums.items()}
        out |= {"train/lr": lr, f"train/{rate_name}": self.units / self.seconds if self.seconds else 0.0}
        self.__init__()
        return out


class MetricsLog:
    """``metrics.jsonl`` of a training stage: one JSON object per line, ``{"step": 10, "train/loss": ...}`` or
    ``{"step": 10, "valid/loss": ...}`` (TensorBoard-style scalar names).

    Resumable: a stage resumed from step ``s`` keeps the lines up to ``s`` and drops later ones (those steps run
    again), and a line whose step and names are already in the file is not written twice. Only the main process
    of a launch writes (``enabled``). Not part of the stage's content: timings differ from run to run.
    """

    def __init__(self, folder: Path, resume_step: int, enabled: bool = True):
        self.path = Path(folder) / METRICS
        self.enabled = enabled
        kept = [r for r in self.read(self.path) if r["step"] <= resume_step] if resume_step else []
        self.seen = {self._key(r) for r in kept}
        if enabled:
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    @staticmethod
    def _key(record: dict[str, Any]) -> tuple:
        return (record["step"], tuple(sorted(record)))

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The complete lines of a metrics file (a line cut short by a kill is skipped)."""
        if not Path(path).is_file():
            return []
        records = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": int(step), **{k: round(float(v), 6) if math.isfinite(v) else None for k, v in values.items()}}
        if not self.enabled or self._key(record) in self.seen:
            return
        self.seen.add(self._key(record))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
