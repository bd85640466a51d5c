"""``MoMForCausalLM``: a causal LM whose token mixer is the MoM layer (Gated DeltaNet with one memory).

    config = MoMLMConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2)
    model = MoMForCausalLM(config)
    out = model(input_ids, labels=input_ids)              # loss (+ aux_loss_weight * mean load-balancing loss)
    model.generate(input_ids, max_new_tokens=20)          # a recurrent-state cache (MoMCache) of constant size

Blocks: x + MoM(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) (the second norm is ``ffn_norm``: the feed-forward input,
which ``mlpmem.lm.keys`` reads as the datastore key). No position embeddings: the recurrence orders the tokens.

Padding: positions where ``attention_mask`` is 0 enter the MoM layer as zeros, which leave a zero state at zero
(keys and values are zero, a zero state decays to zero), so left-padded batches give each row the output of its
unpadded sequence; right padding never reaches earlier tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mlpmem.errors import UsageError
from mlpmem.hf_cache import CACHE_FIELD, pop_cache
from mlpmem.lm.mom.configuration import MoMLMConfig
from mlpmem.lm.mom.layer import MoMConfig, MoMLayer, MoMState, RMSNorm


@dataclass
class MoMCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast and ``aux_loss``: the layers' mean load-balancing loss (unweighted; 0 for Gated
    DeltaNet). ``loss`` includes ``aux_loss_weight * aux_loss`` in training mode."""

    aux_loss: torch.FloatTensor | None = None


def layer_config(config: MoMLMConfig) -> MoMConfig:
    """The MoM layer's sizes from the LM's config."""
    return MoMConfig(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        head_k_dim=config.head_k_dim,
        head_v_dim=config.head_v_dim,
        num_memories=config.num_memories,
        topk=config.topk,
        shared_memory=config.shared_memory,
        conv_size=config.conv_size,
        chunk_size=config.chunk_size,
        norm_eps=config.norm_eps,
    )


class MoMCache:
    """The decoding state of every layer (a ``MoMState`` each) and the number of tokens seen.

    Its size is fixed by the model's sizes and the batch, whatever the context length. ``generate`` reorders it for
    beam search (``reorder_cache``) and expands it for several sequences per prompt (``batch_repeat_interleave``).
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.states: list[MoMState | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def _map(self, fn: Any) -> None:
        self.states = [
            MoMState(*(fn(t) for t in (s.q_conv, s.k_conv, s.v_conv, s.memory))) if s is not None else None
            for s in self.states
        ]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` [B] (beam search)."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def num_elements(self) -> int:
        """Numbers held (all layers): constant in the context length."""
        return sum(t.numel() for s in self.states if s is not None for t in (s.q_conv, s.k_conv, s.v_conv, s.memory))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoMBlock(nn.Module):
    def __init__(self, config: MoMLMConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = MoMLayer(layer_config(config))
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, state: MoMState | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MoMState, torch.Tensor]:
        """x: [B, T, D]; mask: [B, T] (1: a token, 0: padding) or None. Returns (x, new state, aux loss)."""
        h = self.mixer_norm(x)  # [B, T, D]
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)  # padding enters as zeros: it leaves a zero state at zero
        out = self.mixer(h, state=state)
        x = x + out.hidden
        x = x + self.ffn(self.ffn_norm(x))
        return x, out.state, out.aux_loss


class MoMPreTrainedModel(PreTrainedModel):
    config_class = MoMLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MoMBlock"]
    _is_stateful = True  # a recurrent state: no assisted generation (it cannot roll back)

    def _init_weights(self, module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, initializer_range); the MoM layer's own parameters (decay, dt bias,
        convolutions, norms) keep the initialisation of their constructors."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class MoMModel(MoMPreTrainedModel):
    """input_ids [B, T] -> final hidden states [B, T, D], the cache, the layers' mean aux loss."""

    def __init__(self, config: MoMLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoMBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, MoMCache | None, torch.Tensor]:
        past_key_values = pop_cache(kwargs, past_key_values)  # transformers >= 5.24 names it ``cache``
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        T = x.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None and attention_mask.dim() == 2 else None
        if mask is not None and bool(mask.all()):
            mask = None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, MoMCache):
            # a wrapper's generate (the joint model's) may hand over the empty DynamicCache it made
            if past_key_values.get_seq_length() > 0:
                raise UsageError(f"a MoM model continues from a MoMCache, not a {type(past_key_values).__name__}")
            past_key_values = None
        cache = past_key_values if past_key_values is not None else MoMCache(len(self.layers))
        aux = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            x, cache.states[i], layer_aux = block(x, cache.states[i], mask)
            aux = aux + layer_aux.float()
        cache.seen_tokens += T
        return self.norm(x), cache if use_cache else None, aux / max(1, len(self.layers))


class MoMForCausalLM(MoMPreTrainedModel, GenerationMixin):
    """input_ids [B, T] -> logits [B, T, V]; ``loss`` when ``labels`` are given (HF shift: position t predicts
    labels[t + 1], -100 ignored), plus ``aux_loss_weight`` times the mean load-balancing loss in training mode."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoMLMConfig):
        super().__init__(config)
        self.model = MoMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own MoMCache on the first forward

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> MoMCausalLMOutput:
        past_key_values = pop_cache(kwargs, past_key_values)  # transformers >= 5.24 names it ``cache``
        hidden, cache, aux = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # [B, T, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            if self.training and self.config.aux_loss_weight > 0 and self.config.num_memories > 1:
                loss = loss + self.config.aux_loss_weight * aux.to(loss.dtype)
        return MoMCausalLMOutput(loss=loss, logits=logits, aux_loss=aux, **{CACHE_FIELD: cache})

    def _reorder_cache(self, past_key_values: MoMCache, beam_idx: torch.LongTensor) -> MoMCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


AutoModelForCausalLM.register(MoMLMConfig, MoMForCausalLM, exist_ok=True)
