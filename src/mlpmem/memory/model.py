"""The MLP memory: keys of the frozen base LM in, next-token logits out (DESIGN.md §1.4).

input projection (only when the key width differs from the memory width) → ``n_blocks`` residual pre-norm
blocks ``x + FFN(LayerNorm(x))`` → final LayerNorm → vocab head (no bias). A Hugging Face ``PreTrainedModel``:
``save_pretrained`` writes safetensors and a config that carries everything loading and pairing need (key
width, base-model and tokenizer fingerprints, key layer, default λ, the kNN temperature of its targets, α).

    from mlpmem.memory.model import MLPMemory
    memory = MLPMemory.from_pretrained("runs/demo/memory/model")
    logits = memory(keys)  # keys [B, d] or [B, T, d] -> [B, V] or [B, T, V]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from mlpmem.errors import UsageError
from mlpmem.memory.configuration import FFN_TYPES, MLPMemoryConfig, ffn_width  # noqa: F401  (the public names)

log = logging.getLogger(__name__)


class GeluFFN(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """x + FFN(LayerNorm(x))."""

    def __init__(self, config: MLPMemoryConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        ffn = GeluFFN if config.ffn == "gelu" else SwiGLUFFN
        self.ffn = ffn(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class MLPMemory(PreTrainedModel):
    """keys [..., input_dim] -> logits [..., vocab_size]."""

    config_class = MLPMemoryConfig
    base_model_prefix = "memory"
    main_input_name = "keys"
    _no_split_modules = ["Block"]

    def __init__(self, config: MLPMemoryConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.input_dim, config.hidden_size) if config.input_dim != config.hidden_size else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_blocks))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.weight_dtype != "float32":  # an inference copy saved by mlpmem.memory.quantize: same layout
            from mlpmem.memory.quantize import swap_linears

            swap_linears(self, config.weight_dtype, convert=False)
            for module in self.modules():  # norms stay float32 whatever dtype loading sets as the default
                if isinstance(module, nn.LayerNorm):
                    module.float()
        self.post_init()

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, d] or [B, T, d] -> logits [B, V] or [B, T, V]."""
        if keys.shape[-1] != self.config.input_dim:
            raise UsageError(f"memory expects keys of width {self.config.input_dim}, got {keys.shape[-1]}")
        x = keys.to(self.norm.weight.dtype) if not torch.is_autocast_enabled(keys.device.type) else keys
        if self.proj is not None:
            x = self.proj(x)  # [..., h]
        for block in self.blocks:
            x = block(x)  # [..., h]
        return self.head(self.norm(x))  # [..., V]

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def init_head_from(self, embedding_weight: torch.Tensor) -> bool:
        """Copy an LM's output embedding [V, h] into the head when the shapes match; returns whether it did."""
        if tuple(embedding_weight.shape) != tuple(self.head.weight.shape):
            log.warning(
                "vocab head not initialised from the LM: its output embedding is %s, the head is %s",
                tuple(embedding_weight.shape),
                tuple(self.head.weight.shape),
            )
            return False
        with torch.no_grad():
            self.head.weight.copy_(embedding_weight.detach().to(self.head.weight))
        return True


def check_pairing(memory_config: MLPMemoryConfig, lm: PreTrainedModel, model_fingerprint: str) -> str:
    """The LM module the memory reads its keys from; UsageError (one line) when the memory belongs to another base
    LM, or the LM has no such module, or the module's width is not the memory's input width."""
    from mlpmem.lm.keys import key_dim, key_module_path

    if memory_config.base_model_fingerprint != model_fingerprint:
        raise UsageError(
            f"this memory was trained on keys of base model {memory_config.base_model_fingerprint}, "
            f"not {model_fingerprint}; train a memory for this model (mlpmem train-memory)"
        )
    if memory_config.key_layer is None:
        raise UsageError("this memory does not record the LM module its keys come from (key_layer); retrain it")
    layer = key_module_path(lm, memory_config.key_layer)  # UsageError when the LM has no such module
    width = key_dim(lm, layer)
    if memory_config.input_dim != width:
        raise UsageError(
            f"this memory reads keys of width {memory_config.input_dim}, but {layer!r} of the LM gives {width}"
        )
    if memory_config.vocab_size != lm.config.vocab_size:
        raise UsageError(f"the memory predicts {memory_config.vocab_size} tokens, the LM {lm.config.vocab_size}")
    return layer


def load_memory(path_or_run_dir: str | Path, device: torch.device | str = "cpu") -> MLPMemory:
    """A trained memory in eval mode from a run directory (files checked against its manifest), its
    ``train-memory`` folder, or any save_pretrained folder. Its safetensors only (never a pickle); UsageError (one
    line) for weights that cannot be read or hold nan/inf."""
    from safetensors import SafetensorError

    from mlpmem.artifacts import RunDir
    from mlpmem.manifests import TrainMemoryManifest
    from mlpmem.training import non_finite_parameter

    path = Path(path_or_run_dir).expanduser()
    if (path / "train-memory").exists():
        RunDir(path).require(TrainMemoryManifest)
        path = path / "train-memory"
    for folder in (path / "model", path):
        if (folder / "config.json").is_file():
            break
    else:
        raise UsageError(
            f"no MLP memory at {path} (expected RUN_DIR/train-memory/model); run `mlpmem train-memory` first"
        )
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != MLPMemoryConfig.model_type:
        raise UsageError(f"{folder} holds a {model_type!r} model, not an MLP memory")
    try:
        memory = MLPMemory.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"cannot load the memory in {folder}: {reason} (only safetensors weights are read)") from None
    if (name := non_finite_parameter(memory)) is not None:
        raise UsageError(f"{folder}: the memory's weight {name} holds nan/inf (damaged); retrain it")
    return memory.to(device).eval()


AutoModel.register(MLPMemoryConfig, MLPMemory, exist_ok=True)
