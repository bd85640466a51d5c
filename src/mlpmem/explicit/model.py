"""``ExplicitMemoryLM``: a GPT-2 causal LM whose memory layers also attend to retrieved explicit memories.

    model = ExplicitMemoryLM.from_lm(gpt2, memory_layers=[0, 1])        # the same weights, no new parameters
    memory = ExplicitMemory.visible_everywhere(kv)                        # kv [B, R, layers, 2, heads, keep, head_dim]
    logits = model(input_ids, memory=memory).logits
    model.generate(input_ids, memory=memory, max_new_tokens=20)           # the KV cache holds the context only

At a memory layer, each query token attends over [memory keys ; context keys]: one softmax, memory always visible
(no causal mask: a memory is knowledge, not a past token), context causal. Which memories a query token sees is
given per reference as an interval of sequence indices (``start <= index < end``), so one forward can give each
64-token chunk its own memories. Memories are not written to the KV cache: each forward call passes the memories
of the tokens it processes.

Positions: GPT-2's positions are learned embeddings added at the input, so a key or value taken at a memory layer
already carries the position its token had in the reference pass ("<marker> reference", positions 0 .. m + n - 1).
Every memory therefore lies in one shared position interval at the start of the positions, like Memory3's
parallel position encoding; nothing is re-encoded when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedModel
from transformers.models.auto.modeling_auto import AutoModelForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from mlpmem.explicit.configuration import ExplicitMemoryConfig
from mlpmem.hf_cache import CACHE_ARG, pop_cache

NEVER = 1 << 62  # an interval end no sequence reaches


@dataclass
class ExplicitMemory:
    """The memories one forward reads: key/values of R references per sequence, and who sees them.

    ``kv`` [B, R, layers, 2, heads, keep, head_dim] (one entry per memory layer, keys then values); reference r of
    sequence b is visible to the tokens at sequence indices ``start[b, r] <= i < end[b, r]`` (an empty interval:
    a padding slot). A batch of 1 is shared by every sequence. ``mass``, when a list, receives per memory layer the
    mean attention probability on memory tokens of the query tokens that see at least one memory.
    """

    kv: torch.Tensor
    start: torch.Tensor  # [B, R] int64
    end: torch.Tensor  # [B, R] int64
    mass: list[float] | None = field(default=None)

    @classmethod
    def visible_everywhere(cls, kv: torch.Tensor) -> ExplicitMemory:
        """Memories every token sees (generation: retrieved once for the prompt)."""
        b, r = kv.shape[:2]
        zeros = torch.zeros(b, r, dtype=torch.long, device=kv.device)
        return cls(kv, zeros, torch.full_like(zeros, NEVER))

    @property
    def references(self) -> int:
        return self.kv.shape[1]

    def layer(self, index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of memory layer ``index`` as [B, heads, R * keep, head_dim] each."""
        kv = self.kv[:, :, index]  # [b, R, 2, H, keep, d]
        kv = kv.expand(batch, *kv.shape[1:]) if kv.shape[0] == 1 else kv
        b, r, _, h, keep, d = kv.shape
        kv = kv.permute(2, 0, 3, 1, 4, 5).reshape(2, b, h, r * keep, d)
        return kv[0], kv[1]

    def allowed(self, positions: torch.Tensor, batch: int, keep: int) -> torch.Tensor:
        """[B, 1, Lq, R * keep] bool: which memory tokens each query (at sequence index ``positions`` [Lq]) sees."""
        start, end = (x.to(positions.device) for x in (self.start, self.end))
        start, end = (x.expand(batch, -1) if x.shape[0] == 1 else x for x in (start, end))
        p = positions[None, :, None]  # [1, Lq, 1]
        seen = (start[:, None, :] <= p) & (p < end[:, None, :])  # [B, Lq, R]
        return seen.repeat_interleave(keep, dim=-1)[:, None]


def context_allowed(mask: torch.Tensor | None, lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """[B | 1, 1, Lq, Lk] bool from HF's attention mask (bool, additive float, or None = plain causal)."""
    if mask is None:
        q = torch.arange(lk - lq, lk, device=device)[:, None]
        return (torch.arange(lk, device=device)[None, :] <= q)[None, None]
    mask = mask[..., -lq:, :lk]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    mem_allowed: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over [memory ; context]: q [B, H, Lq, d], k/v [B, H, Lk, d], mem_k/mem_v [B, H, M, d], masks
    bool [B|1, 1, Lq, Lk] and [B, 1, Lq, M]. Returns the output [B, Lq, H, d] and the probabilities
    [B, H, Lq, M + Lk]."""
    scores = torch.cat([mem_k.to(k.dtype), k], dim=2).float()  # [B, H, M + Lk, d]
    scores = torch.matmul(q.float(), scores.transpose(-1, -2)) * scaling  # [B, H, Lq, M + Lk]
    mask = torch.cat([mem_allowed, allowed.expand(mem_allowed.shape[0], -1, -1, -1)], dim=-1)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(dropout(probs).to(v.dtype), torch.cat([mem_v, v], dim=2))  # [B, H, Lq, d]
    return out.transpose(1, 2), probs


class MemoryAttention(GPT2Attention):
    """GPT-2 attention (same parameters) that also reads the ``memory`` passed to the forward call."""

    def __init__(self, config: ExplicitMemoryConfig, layer_idx: int, memory_index: int):
        super().__init__(config, layer_idx=layer_idx)
        self.memory_index = memory_index

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, memory=None, **kwargs):
        past_key_values = pop_cache(kwargs, past_key_values)  # transformers >= 5.24 names it ``cache``
        if memory is None or memory.references == 0:
            return super().forward(
                hidden_states, attention_mask=attention_mask, **{CACHE_ARG: past_key_values}, **kwargs
            )
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))  # [B, H, Lq, d]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [B, H, Lk, d]
        b, _, lq, _ = q.shape
        lk = k.shape[2]
        mem_k, mem_v = (x.to(q.device) for x in memory.layer(self.memory_index, b))
        positions = torch.arange(lk - lq, lk, device=q.device)  # sequence index of each query
        mem_allowed = memory.allowed(positions, b, self.config.keep_tokens)
        out, probs = memory_attention(
            q,
            k,
            v,
            context_allowed(attention_mask, lq, lk, q.device),
            mem_k,
            mem_v.to(v.dtype),
            mem_allowed,
            self.scaling,
            self.attn_dropout,
        )
        if memory.mass is not None:
            sees = mem_allowed.any(-1).expand(-1, probs.shape[1], -1)  # [B, H, Lq]
            on_memory = probs[..., : mem_k.shape[2]].sum(-1)  # [B, H, Lq]
            memory.mass.append(float(on_memory[sees].mean()) if sees.any() else float("nan"))
        out = self.resid_dropout(self.c_proj(out.reshape(b, lq, -1).contiguous()))
        return out, probs


class ExplicitMemoryLM(GPT2LMHeadModel):
    """GPT-2 causal LM reading explicit memories at ``config.memory_layers``; without memories it is the plain LM."""

    config_class = ExplicitMemoryConfig

    def __init__(self, config: ExplicitMemoryConfig):
        super().__init__(config)
        for i, layer in enumerate(config.memory_layers):
            block = self.transformer.h[layer]
            block.attn = MemoryAttention(config, layer, i)
        self.post_init()

    @classmethod
    def from_lm(cls, lm: PreTrainedModel, **memory_settings) -> ExplicitMemoryLM:
        """The explicit-memory LM with ``lm``'s weights (a GPT-2 causal LM); no parameter is added."""
        if lm.config.model_type not in ("gpt2", ExplicitMemoryConfig.model_type):
            raise ValueError(f"explicit memory needs a GPT-2 LM, not {lm.config.model_type!r}")
        config = ExplicitMemoryConfig.from_gpt2(lm.config, **memory_settings)
        model = cls(config)
        model.load_state_dict(lm.state_dict())
        return model.to(next(lm.parameters()).device)

    def forward(
        self, input_ids=None, past_key_values=None, attention_mask=None, memory: ExplicitMemory | None = None, **kwargs
    ):
        if memory is not None:
            kwargs["memory"] = memory
        past_key_values = pop_cache(kwargs, past_key_values)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, **{CACHE_ARG: past_key_values}, **kwargs
        )


AutoModelForCausalLM.register(ExplicitMemoryConfig, ExplicitMemoryLM, exist_ok=True)
