"""The key hook: the input of a transformer block's feed-forward sub-layer (the last block's by default), per family.

kNN-LM (Khandelwal et al. 2020) found this the best key: the output of the last block's second norm
(``ln_2`` in GPT-2, ``post_attention_layernorm`` in Llama/Mistral/Qwen2/GPT-NeoX, ``final_layer_norm`` in
OPT, ``ffn_norm`` in mlpmem's MoM LM). One table maps the HF ``config.model_type`` to that module; ``--key-layer``
names any other module.

    with KeyHook(model) as hook:
        model(input_ids)
        keys = hook.keys  # [batch, seq, dim]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mlpmem.errors import UsageError

# model_type -> module path of a block's feed-forward input norm ({block} = the block's index)
KEY_MODULES: dict[str, str] = {
    "gpt2": "transformer.h.{block}.ln_2",
    "gpt_neox": "gpt_neox.layers.{block}.post_attention_layernorm",
    "opt": "model.decoder.layers.{block}.final_layer_norm",
    "llama": "model.layers.{block}.post_attention_layernorm",
    "mistral": "model.layers.{block}.post_attention_layernorm",
    "qwen2": "model.layers.{block}.post_attention_layernorm",
    "mlpmem-mom": "model.layers.{block}.ffn_norm",  # MoM and Gated DeltaNet (mlpmem.lm.mom.model)
}

# OPT-350m style (do_layer_norm_before=False) normalises after the sub-layers: there the feed-forward input is
# the output of the attention norm, and final_layer_norm follows the feed-forward.
_OPT_POST_NORM = "model.decoder.layers.{block}.self_attn_layer_norm"


def _n_layers(model: PreTrainedModel) -> int:
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UsageError(f"cannot tell how many layers the {cfg.model_type!r} model has; give --key-layer MODULE_PATH")


def depth_block(model: PreTrainedModel, depth: float) -> int:
    """The block at ``depth`` (0 < depth <= 1) of the model's layers: ceil(depth * n) - 1 (1.0: the last block)."""
    import math

    return max(0, math.ceil(depth * _n_layers(model) - 1e-9) - 1)


def key_module_path(model: PreTrainedModel, key_layer: str | None = None, depth: float | None = None) -> str:
    """The module whose output is the key: ``key_layer`` when given, else the family's feed-forward input norm of
    the block at ``depth`` (default: the last block)."""
    if key_layer is None:
        family = model.config.model_type
        if family not in KEY_MODULES:
            known = ", ".join(sorted(KEY_MODULES))
            raise UsageError(
                f"no default key layer for model family {family!r} (known: {known}); "
                "give --key-layer MODULE_PATH (the last block's feed-forward input norm)"
            )
        template = KEY_MODULES[family]
        if family == "opt" and not getattr(model.config, "do_layer_norm_before", True):
            template = _OPT_POST_NORM
        key_layer = template.format(block=depth_block(model, depth) if depth is not None else _n_layers(model) - 1)
    try:
        model.get_submodule(key_layer)
    except AttributeError:
        raise UsageError(f"{key_layer!r}: the model has no such module", field="key_layer") from None
    return key_layer


def ffn_inputs(model: PreTrainedModel) -> str | None:
    """The family's feed-forward input modules, first to last block ("transformer.h.0.ln_2 .. transformer.h.3.ln_2"),
    or None for a family outside ``KEY_MODULES``."""
    family = model.config.model_type
    if family not in KEY_MODULES:
        return None
    template = KEY_MODULES[family]
    if family == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        template = _OPT_POST_NORM
    return f"{template.format(block=0)} .. {template.format(block=_n_layers(model) - 1)}"


def not_a_key(model: PreTrainedModel, path: str, output: Any) -> UsageError:
    """The error for a key module whose output is not one [batch, seq, width] tensor (a whole backbone...)."""
    what = f"a {type(output).__name__}" if not isinstance(output, torch.Tensor) else f"a {output.dim()}-D tensor"
    choices = ffn_inputs(model)
    blocks = f"a block's feed-forward input ({choices})" if choices else "a block's feed-forward input"
    return UsageError(
        f"{path!r} outputs {what}, not one [batch, seq, width] tensor; give {blocks}, or another module that "
        "outputs one tensor (e.g. lm_head)",
        field="key_layer",
    )


def key_dim(model: PreTrainedModel, key_layer: str | None = None) -> int:
    """Width of the keys: the norm's weight size, else measured on a 2-token forward."""
    path = key_module_path(model, key_layer)
    weight = getattr(model.get_submodule(path), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    with KeyHook(model, path) as hook, torch.inference_mode():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device))
    return int(hook.keys.shape[-1])


class KeyHook:
    """Context manager keeping the key module's output of the latest forward as ``keys`` [batch, seq, dim].

    Some families (OPT) flatten the feed-forward input to [batch * seq, dim]; the batch and sequence sizes are
    taken from the model's own inputs, so ``keys`` is always 3-D. Keys are detached, on the model's device.
    """

    def __init__(self, model: PreTrainedModel, key_layer: str | None = None):
        self.model = model
        self.path = key_module_path(model, key_layer)
        self.module: nn.Module = model.get_submodule(self.path)
        self.keys: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None
        self._handles: list[Any] = []

    def _on_model_input(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self._shape = (int(x.shape[0]), int(x.shape[1])) if x is not None else None

    def _on_key_output(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
            raise not_a_key(self.model, self.path, out)
        out = out.detach()
        if out.dim() == 2 and self._shape is not None:
            out = out.view(*self._shape, out.shape[-1])  # [batch * seq, d] -> [batch, seq, d]
        self.keys = out

    def __enter__(self) -> KeyHook:
        # callers may skip the LM head by calling the backbone (base_model) directly: watch the inputs of both
        tops = {id(m): m for m in (self.model, getattr(self.model, "base_model", self.model))}.values()
        self._handles = [top.register_forward_pre_hook(self._on_model_input, with_kwargs=True) for top in tops]
        self._handles.append(self.module.register_forward_hook(self._on_key_output))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
