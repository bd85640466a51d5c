"""Multi-query associative recall (MQAR, Zoology arXiv 2312.04927): the synthetic recall task that tells apart
sequence models whose state grows with the context (attention) from those with a fixed-size state (linear
recurrences such as Gated DeltaNet and MoM).

One example of ``seq_len`` tokens: ``num_pairs`` key-value pairs, then a query region in which every key of the
context appears once, in random order, at random positions; the model must output the key's value at the query's
position. Everything else in the query region is random filler, and only the query positions are scored.

    k_1 v_1 k_2 v_2 ... k_N v_N | x x k_3 x k_1 x x x k_N ...        inputs   [seq_len]
                                |     v_3   v_1       v_N            targets  (-100 elsewhere)

Keys are drawn without replacement from ``1 .. vocab_size/2 - 1`` and values, also without replacement, from
``vocab_size/2 .. vocab_size - 1``; filler tokens from the whole vocabulary. As in
Zoology, the query slots are the even offsets of the query region, drawn without replacement with probability
proportional to ``gap^(power_a - 1)``, so most queries come soon after the context (``power_a`` = 0.01).

``targets[t]`` is the token the model must predict at position t (its next-token target), so a model's logits
[B, T, V] are scored against ``targets`` [B, T] directly, with no shift.

    batch = mqar_batch(MQARTask(seq_len=128, num_pairs=16), num_examples=64, seed=0)
    batch.inputs, batch.targets        # int64 [64, 128] each; targets -100 except at the 16 query positions
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlpmem.errors import UsageError

IGNORE = -100  # targets of the positions that are not scored


@dataclass(frozen=True)
class MQARTask:
    """One cell of the benchmark grid."""

    seq_len: int  # tokens per example
    num_pairs: int  # key-value pairs in the context (= queries per example)
    vocab_size: int = 256  # keys from the lower half, values from the upper half
    power_a: float = 0.01  # the query positions' power law (Zoology's default)

    def __post_init__(self) -> None:
        problems = []
        if self.num_pairs < 1:
            problems.append(("num_pairs", f"must be >= 1, got {self.num_pairs}"))
        if self.seq_len < 4 * self.num_pairs:
            problems.append(("seq_len", f"must be >= 4 * num_pairs ({4 * self.num_pairs}), got {self.seq_len}"))
        if self.vocab_size // 2 - 1 < self.num_pairs:
            problems.append(("vocab_size", f"must be >= 2 * (num_pairs + 1) ({2 * self.num_pairs + 2})"))
        if not self.power_a > 0:
            problems.append(("power_a", f"must be > 0, got {self.power_a}"))
        if problems:
            raise UsageError("; ".join(f"{name}: {why}" for name, why in problems), field=problems[0][0])

    @property
    def name(self) -> str:
        return f"L{self.seq_len}-N{self.num_pairs}"


@dataclass
class MQARBatch:
    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64: the value at each query position, IGNORE elsewhere


def mqar_batch(task: MQARTask, num_examples: int, seed: int) -> MQARBatch:
    """``num_examples`` examples of ``task``; the same (task, num_examples, seed) gives the same batch."""
    rng = np.random.default_rng([seed, task.seq_len, task.num_pairs, task.vocab_size])
    B, T, N, V = num_examples, task.seq_len, task.num_pairs, task.vocab_size
    half = V // 2
    keys = np.stack([rng.choice(np.arange(1, half), N, replace=False) for _ in range(B)])  # [B, N]
    values = np.stack([rng.choice(np.arange(half, V), N, replace=False) for _ in range(B)])  # [B, N]
    space = (T - 2 * N) // 2  # even offsets of the query region
    p = np.arange(1, space + 1, dtype=np.float64) ** (task.power_a - 1)
    p /= p.sum()
    slots = np.stack([rng.choice(space, N, replace=False, p=p) for _ in range(B)])  # [B, N]: key i asked at slot
    inputs = rng.integers(0, V, size=(B, T))  # filler everywhere, then the context and the queries
    inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2] = keys, values
    query_pos = 2 * N + 2 * slots  # [B, N]
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(targets, query_pos, values, axis=1)
    return MQARBatch(torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(targets))


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """logits [B, T, V], targets [B, T] -> (correct, scored): argmax hits at the query positions."""
    scored = targets != IGNORE  # [B, T]
    return int((logits.argmax(-1)[scored] == targets[scored]).sum()), int(scored.sum())


# equal-parameter models -------------------------------------------------------------------------------------
ARCHS = ("gpt2", "gated-deltanet", "mom")


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_model(arch: str, vocab_size: int, width: int, layers: int, heads: int, ffn: int, max_len: int):
    """A random-init causal LM: GPT-2 (``ffn`` = n_inner), Gated DeltaNet or MoM (4 memories, top-2, shared;
    ``ffn`` = the SwiGLU width). Heads of width ``width // heads`` everywhere; no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlpmem.lm.mom.configuration import MoMLMConfig
    from mlpmem.lm.mom.model import MoMForCausalLM

    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=max_len,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    sizes = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_heads=heads)
    if arch == "gated-deltanet":
        return MoMForCausalLM(MoMLMConfig.gated_deltanet(**sizes, intermediate_size=ffn))
    if arch == "mom":
        return MoMForCausalLM(MoMLMConfig(**sizes, num_memories=4, topk=2, shared_memory=True, intermediate_size=ffn))
    raise UsageError(f"unknown architecture {arch!r} (one of {', '.join(ARCHS)})", field="arch")


def matched_ffn(arch: str, target: int, **sizes) -> int:
    """The FFN width (a multiple of 8) that brings ``arch``'s parameter count closest to ``target``: the count is
    linear in the FFN width, so two probes give it."""
    small, large = (num_parameters(build_model(arch, ffn=f, **sizes)) for f in (8, 16))
    per_unit = (large - small) / 8
    return max(8, 8 * round((8 + (target - small) / per_unit) / 8))


def equal_parameter_models(vocab_size: int, width: int, layers: int, heads: int, mom_ffn: int, max_len: int):
    """{arch: model}: MoM with FFN width ``mom_ffn`` sets the parameter count; GPT-2 and Gated DeltaNet, whose token
    mixers are smaller, get the FFN width that matches it."""
    sizes = dict(vocab_size=vocab_size, width=width, layers=layers, heads=heads, max_len=max_len)
    mom = build_model("mom", ffn=mom_ffn, **sizes)
    target = num_parameters(mom)
    return {
        "gpt2": build_model("gpt2", ffn=matched_ffn("gpt2", target, **sizes), **sizes),
        "gated-deltanet": build_model("gated-deltanet", ffn=matched_ffn("gated-deltanet", target, **sizes), **sizes),
        "mom": mom,
    }
