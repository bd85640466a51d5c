"""``mlpmem generate --explicit``: continue prompts with the run's explicit-memory LM.

    mlpmem generate --run-dir runs/explicit-demo --explicit --prompt "The castle was"

Each prompt's last ``query_tokens`` (64) tokens retrieve ``explicit_k`` (5) references; every token of the prompt
and of the continuation reads their memories (retrieved once per prompt; the KV cache holds the text only). Any
decoding transformers' ``generate`` offers (greedy, sampling, beams) works unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mlpmem.artifacts import RunDir
from mlpmem.config import GenerateConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.explicit.model import ExplicitMemory
from mlpmem.explicit.scoring import ExplicitReader
from mlpmem.lm.load import load_tokenizer


def prompt_memory(reader: ExplicitReader, ids: np.ndarray, device) -> ExplicitMemory:
    """The memories of the references a prompt's last tokens retrieve, seen by every token."""
    refs = reader.store.search(ids, [len(ids)], reader.k)  # [1, k]
    return ExplicitMemory.visible_everywhere(reader.store.kv(refs[:, refs[0] >= 0]).to(device))


def generate_explicit(config: GenerateConfig, prompts: list[str], kwargs: dict[str, Any]) -> tuple[list[str], str]:
    """(continuations of each prompt, in order; what generated them) (``kwargs``: transformers' generate arguments)."""
    run = RunDir(config.run_dir)
    device = resolve_device(config.device)
    reader = ExplicitReader.open(run, config.explicit_k, device, control=False)
    tokenizer = load_tokenizer(run.file("train-explicit", "model"))
    positions = reader.model.config.n_positions
    outputs = []
    torch.manual_seed(config.seed)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)  # [1, P]
        if ids.shape[1] + config.max_new_tokens > positions:
            raise UsageError(f"prompt + new tokens exceed the LM's {positions} positions", field="max_new_tokens")
        memory = prompt_memory(reader, ids[0].cpu().numpy(), device)
        out = reader.model.generate(
            ids, attention_mask=torch.ones_like(ids), memory=memory, pad_token_id=tokenizer.eos_token_id, **kwargs
        )
        outputs.extend(tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))
    described = f"explicit memory: {reader.k} references from the prompt's last {reader.store.query_tokens} tokens"
    return outputs, described
