"""What benchmarks measure and how they print it: per-token decode latency inside transformers' generate (with its
spread over rounds), batched scoring throughput, and byte and entry counts for people. Used by ``mlpmem bench``
and by the system packages' own benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

NOISY = 0.25  # a spread (max - min of the rounds' medians) above this share of the median makes ratios unreliable


@dataclass(frozen=True)
class Spread:
    """Min, median and max of one timing over the timed rounds (each round's own median)."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        v = np.asarray(list(values), dtype=np.float64)
        return cls(float(v.min()), float(np.median(v)), float(v.max()))

    @property
    def noisy(self) -> bool:
        """Whether the rounds disagree by more than NOISY of the median (load changed while timing)."""
        return (self.max - self.min) > NOISY * self.median

    def rounded(self, digits: int = 4) -> list[float]:
        return [round(self.min, digits), round(self.median, digits), round(self.max, digits)]


def added_ms(system: Spread, base: Spread) -> float | None:
    """What a system adds to base's step (medians), or None when it is not measurable: not above zero, or
    smaller than the spread of either timing. Never negative."""
    diff = system.median - base.median
    noise = max(system.max - system.min, base.max - base.min)
    return round(diff, 4) if diff > 0 and diff > noise else None


class StepClock(LogitsProcessor):
    """A no-op logits processor that notes the time of every decode step (one call per new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def decode_step_seconds(generate: Callable[..., object], prompt: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Seconds between consecutive decode steps of one greedy ``generate`` call (batch of ``prompt``, KV cache).

    Each interval is one full step as a user sees it: the forward of the new token (with its hooks: memory,
    retrieval, mixing) and generate's own token selection. The prefill is excluded.
    """
    clock = StepClock()
    generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=0,
    )
    return np.diff(np.asarray(clock.times))


def interleaved_decode_ms(
    systems: dict[str, Callable[..., object]], prompt: torch.Tensor, new_tokens: int, repeats: int
) -> dict[str, Spread]:
    """ms per decode step of each system, as the spread of the rounds' medians; one warm-up each, then
    ``repeats`` rounds that visit every system in turn (so a change in machine load hits all systems alike)."""
    rounds: dict[str, list[float]] = {name: [] for name in systems}
    for round_ in range(repeats + 1):
        for name, generate in systems.items():
            times = decode_step_seconds(generate, prompt, new_tokens)
            if round_:
                rounds[name].append(float(np.median(times)) * 1e3)
    return {name: Spread.of(r) for name, r in rounds.items()}


def interleaved_scoring_tokens_per_s(
    systems: dict[str, Callable[[torch.Tensor], torch.Tensor]], batch: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Tokens/s of each system scoring ``batch`` [B, T] (log-probs of every next token), median over rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    gold = batch[:, 1:, None]
    for round_ in range(repeats + 1):
        for name, score in systems.items():
            t0 = time.perf_counter()
            log_probs = score(batch)  # [B, T, V]
            log_probs[:, :-1].gather(-1, gold).sum().item()  # the scores a perplexity needs; syncs a GPU
            if round_:
                seconds[name].append(time.perf_counter() - t0)
    return {name: batch.numel() / float(np.median(s)) for name, s in seconds.items()}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for value, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= value:
            return f"{n / value:g}{suffix}"
    return str(n)
