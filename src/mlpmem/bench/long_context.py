"""Base + memory against the decoder of equal parameters at a long context (batch 1, KV cache): the paper's speed
claim (1.3x at 1024) is about decode steps whose attention reads a long cache, where a deeper decoder pays per
layer and the memory does not.

The run's LM may have fewer positions than the context asked for, so both transformers are random-init copies of
its architecture with enough positions (only their speed matters); the memory is the run's, at its dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mlpmem.inference.generation import MemoryAugmentedLM
from mlpmem.measure import Spread, interleaved_decode_ms
from mlpmem.memory_system import SystemName


def with_positions(lm: PreTrainedModel, positions: int, extra_layers: int = 0) -> PreTrainedModel:
    """A random-init copy of ``lm``'s architecture with at least ``positions`` positions and ``extra_layers`` more."""
    cfg = copy.deepcopy(lm.config)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, name, None) is not None:
            setattr(cfg, name, max(getattr(cfg, name), positions))
    cfg.num_hidden_layers = cfg.num_hidden_layers + extra_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(next(lm.parameters()).device).eval()
    model.generation_config.eos_token_id = None
    return model


def long_context_decode(
    lm: PreTrainedModel,
    memory: nn.Module,
    memory_layer: str,
    decoder_layers: int,
    context: int,
    new_tokens: int,
    repeats: int,
    lmbda: float,
) -> dict[str, Spread]:
    """Decode ms per token of base, base + memory and the equal-parameter decoder, each step reading a KV cache of
    about ``context`` tokens (prompt of context - new_tokens random tokens)."""
    base = with_positions(lm, context)
    decoder = with_positions(lm, context, decoder_layers - lm.config.num_hidden_layers)
    mlm = MemoryAugmentedLM(base, memory=memory, lmbda=lmbda, memory_layer=memory_layer)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, lm.config.vocab_size, (1, context - new_tokens), generator=g).to(base.device)  # [1, P]

    def plain(model):
        def generate(ids: torch.Tensor, **kwargs):
            with torch.inference_mode():
                return model.generate(ids, **kwargs)

        return generate

    systems = {
        SystemName.BASE: plain(base),
        SystemName.MLP_MEMORY: mlm.generate,
        SystemName.DECODER_EQUAL_PARAMS: plain(decoder),
    }
    return interleaved_decode_ms(systems, prompt, new_tokens, repeats)
