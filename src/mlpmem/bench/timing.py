"""Timers: per-token decode latency inside transformers' generate, and batched scoring throughput."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList


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
) -> dict[str, float]:
    """Median ms per decode step of each system; one warm-up each, then ``repeats`` rounds that visit every
    system in turn (so a change in machine load hits all systems alike)."""
    steps: dict[str, list[np.ndarray]] = {name: [] for name in systems}
    for round_ in range(repeats + 1):
        for name, generate in systems.items():
            times = decode_step_seconds(generate, prompt, new_tokens)
            if round_:
                steps[name].append(times)
    return {name: float(np.median(np.concatenate(t)) * 1e3) for name, t in steps.items()}


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
