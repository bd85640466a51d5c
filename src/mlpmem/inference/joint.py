"""The memory-augmented model as a native Hugging Face causal LM: base LM + MLP memory (+ kNN-LM) in one folder.

    import mlpmem                                    # registers the classes with the Auto classes
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exports/demo")     # written by `mlpmem export`
    out = model(input_ids, labels=input_ids)  # out.logits: mixed next-token log-probs [B, T, V]; out.loss: mixed NLL
    model.generate(input_ids, max_new_tokens=20, num_beams=4)        # every strategy, with the KV cache

``forward`` runs the unmodified base LM (``self.lm``) with a key hook (``mlpmem.lm.keys.KeyHook``) on each layer its
components read (the MLP memory's, kNN-LM's: ``mlpmem.memory_system.Component``, built by their systems in
``mlpmem.systems``), and returns ``mix_log_probs([log p_LM, log p_mem, log p_kNN], weights)`` of the positions
the LM returns (``logits_to_keep``; ``generate`` asks for the last one) in place of the logits, so HF's loss,
``generate`` (logits processors, sampling, beam search), ``pipeline`` and ``Trainer`` act on the mixed distribution.
With the KV cache each decode step forwards only the new token: the memory runs once per new token. With nothing
to mix (no memory and no kNN-LM, or zero weights) the LM's own logits pass through unchanged.

The folder holds the base LM's weights (``lm.*``) and the memory's (``memory.*``) in one safetensors file; its
config the LM's config (``text_config``), the memory's, λ, the key layers and the sha256 of the LM's and of the
memory's weights. Loading reads safetensors only (never a pickle) and refuses, with one line, a damaged file,
weights holding nan/inf, weights that are not the ones exported, and a ``memory_layer`` the memory was not trained
on, that the LM lacks or whose width is not the memory's input. kNN-LM is optional and not stored: ``knn`` names
the run whose datastore and index it searches.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mlpmem.errors import UsageError
from mlpmem.hf_cache import CACHE_ARG, CACHE_FIELD, cache_of, pop_cache
from mlpmem.inference.configuration import MemoryAugmentedConfig, check_weights
from mlpmem.inference.mixing import mix_log_probs
from mlpmem.lm.keys import KeyHook, key_dim, key_module_path
from mlpmem.memory_system import Component
from mlpmem.systems import KNN_LM, MLP_MEMORY


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's tensors (tied tensors counted once)."""
    digest, seen = hashlib.sha256(), set()
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        ptr = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.device.type != "meta" else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class MemoryAugmentedForCausalLM(PreTrainedModel, GenerationMixin):
    """input_ids [B, T] -> mixed next-token log-probs [B, T, V] as ``logits`` (and the mixed NLL as ``loss``).

    Built from trained parts (``from_parts``) or loaded from an exported folder (``from_pretrained``). ``memory`` is
    any module mapping keys [..., d] to logits [..., V] (an ``MLPMemory``, or a quantised / compiled copy of one);
    ``knn`` a ``KnnRetriever`` (not saved with the weights).
    """

    config_class = MemoryAugmentedConfig
    base_model_prefix = "mlpmem"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MemoryAugmentedConfig):
        super().__init__(config)
        if config.text_config is None:
            raise UsageError("this model's config has no base LM config (text_config); re-export it (mlpmem export)")
        self.lm = AutoModelForCausalLM.from_config(config.text_config)
        self.memory = MLP_MEMORY.module(config.memory_config) if config.memory_config is not None else None
        self.knn = None  # a KnnRetriever, attached by from_parts / from_pretrained
        self.post_init()

    # construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        lm: PreTrainedModel,
        memory: nn.Module | None = None,
        lmbda: float = 0.25,
        knn: Any = None,
        knn_lmbda: float = 0.0,
        memory_layer: str | None = None,
        knn_layer: str | None = None,
        knn_settings: dict[str, Any] | None = None,
        base_model_fingerprint: str | None = None,
    ) -> MemoryAugmentedForCausalLM:
        """The joint model around trained modules (shared, not copied). ``memory_layer`` defaults to the memory's
        ``config.key_layer``, else the last block's feed-forward input; ``knn_layer`` to the latter."""
        lmbda = float(lmbda) if memory is not None else 0.0
        knn_lmbda = float(knn_lmbda) if knn is not None else 0.0
        check_weights(lmbda, knn_lmbda)
        memory_config = getattr(memory, "config", None) if memory is not None else None
        memory_config = memory_config if isinstance(memory_config, MLP_MEMORY.config_class) else None
        default_layer = memory_config.key_layer if memory_config is not None else None
        knn_part = None
        if knn is not None:
            knn_part = {
                **(knn_settings or {}),
                "k": int(knn.k),
                "knn_temperature": float(knn.temperature),
                "knn_lmbda": knn_lmbda,
                "key_layer": key_module_path(lm, knn_layer),
            }
        config = MemoryAugmentedConfig(
            text_config=lm.config,
            memory_config=memory_config,
            lmbda=lmbda,
            memory_layer=key_module_path(lm, memory_layer or default_layer) if memory is not None else None,
            knn=knn_part,
            base_model_fingerprint=base_model_fingerprint,
        )
        with torch.device("meta"):  # no second copy of the weights: the trained modules replace these
            model = cls(config)
        model.lm, model.memory, model.knn = lm, memory, knn
        model.generation_config = lm.generation_config
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load an exported folder (its safetensors only: pickled weights are never read), check it
        (``check_loaded``) and attach its kNN-LM (when ``config.knn``) from the run named there. UsageError (one
        line) for a folder that cannot be read or fails a check."""
        where = pretrained_model_name_or_path
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["use_safetensors"] = True  # a pytorch_model.bin is a pickle: never unpickled, whatever the caller asks
        refuse_pickled_weights(Path(where))
        try:
            model, info = super().from_pretrained(where, *args, output_loading_info=True, **kwargs)
        except (OSError, ValueError, SafetensorError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(
                f"cannot load {where}: {reason} (only safetensors weights are read); re-export it (mlpmem export)"
            ) from None
        missing = [k for k in info.get("missing_keys", ()) if k not in model.all_tied_weights_keys]
        if missing:
            part = "base LM" if missing[0].startswith("lm.") else "memory"
            raise UsageError(
                f"{where}: the {part}'s weights are missing ({len(missing)} tensors, e.g. "
                f"{missing[0]}); re-export it (mlpmem export)"
            )
        model.check_loaded(where)
        if model.config.knn:
            model.attach_knn()
        return (model, info) if want_info else model

    def check_loaded(self, where: str | Path) -> None:
        """UsageError (one line) unless the loaded weights are finite and the ones exported (their recorded
        sha256), and the memory reads the LM module it was trained on, which the LM has, at the memory's width."""
        from mlpmem.training import non_finite_parameter

        if (name := non_finite_parameter(self)) is not None:
            raise UsageError(f"{where}: weight {name} holds nan/inf (damaged); re-export it (mlpmem export)")
        for part, module, expected in (
            ("base LM", self.lm, self.config.lm_weights_sha256),
            ("memory", self.memory, self.config.memory_weights_sha256),
        ):
            if module is not None and expected is not None and weights_sha256(module) != expected:
                raise UsageError(
                    f"{where}: the {part}'s weights are not the ones exported (damaged, edited or another model's); "
                    "re-export it (mlpmem export)"
                )
        if self.memory is not None:
            self.check_memory_layer(where)

    def check_memory_layer(self, where: str | Path) -> None:
        """UsageError unless ``config.memory_layer`` is the module the memory was trained on (its config's
        ``key_layer``), the LM has it, and its width is the memory's input width."""
        layer, memory_config = self.config.memory_layer, self.config.memory_config
        trained = memory_config.key_layer
        if layer is None or (trained is not None and layer != trained):
            raise UsageError(
                f"{where}: memory_layer {layer!r} is not the LM module the memory was trained on ({trained!r}); "
                "re-export it (mlpmem export)"
            )
        try:
            self.lm.get_submodule(layer)
        except AttributeError:
            raise UsageError(f"{where}: the base LM has no module {layer!r} (memory_layer)") from None
        width = key_dim(self.lm, layer)
        if width != memory_config.input_dim:
            raise UsageError(
                f"{where}: memory_layer {layer!r} gives keys of width {width}, the memory reads "
                f"{memory_config.input_dim}; re-export it (mlpmem export)"
            )

    def attach_knn(self) -> None:
        """The kNN-LM retriever of ``config.knn`` (its run's datastore and index, checked against the base model)."""
        self.knn = KNN_LM.attach(self.config.knn, self.config.base_model_fingerprint)

    # what is mixed ---------------------------------------------------------------------------------------------
    @property
    def lmbda(self) -> float:
        return self.config.lmbda if self.memory is not None else 0.0

    @property
    def knn_lmbda(self) -> float:
        return float(self.config.knn["knn_lmbda"]) if self.knn is not None and self.config.knn else 0.0

    @property
    def memory_layer(self) -> str | None:
        return self.config.memory_layer if self.memory is not None else None

    @property
    def knn_layer(self) -> str | None:
        return self.config.knn["key_layer"] if self.knn is not None and self.config.knn else None

    @property
    def key_layers(self) -> list[str]:
        """The LM modules whose outputs the mixing reads (none when nothing is mixed in)."""
        return list(dict.fromkeys(c.layer for c, _ in self.components()))

    def components(self) -> list[tuple[Component, float]]:
        """The components mixed in (weight > 0) with their weights: the memory's, then kNN-LM's."""
        out = []
        if self.lmbda > 0:
            out.append((MLP_MEMORY.component(self.memory, self.memory_layer), self.lmbda))
        if self.knn_lmbda > 0:
            out.append((KNN_LM.component(self.knn, self.knn_layer), self.knn_lmbda))
        return out

    def mix(self, logits: torch.Tensor, keys: dict[str, torch.Tensor]) -> torch.Tensor:
        """LM logits [B, L, V] and keys {layer: [B, L, d]} of the same positions -> joint log-probs [B, L, V] fp32."""
        parts = self.components()
        log_probs = [torch.log_softmax(logits.float(), dim=-1)]
        log_probs += [c.log_probs(keys[c.layer], logits.shape[-1]) for c, _ in parts]  # [B, L, V] each
        lm_weight = 1.0
        for _, w in parts:
            lm_weight -= w  # (1 - λ_mem) - λ_kNN, in that order
        return mix_log_probs(log_probs, [lm_weight] + [w for _, w in parts])

    # the HF model contract ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``logits``: mixed log-probs [B, L', V] of the next token at the last L' positions (all when
        ``logits_to_keep`` is 0); ``loss``: mean NLL of ``labels`` [B, T] (shifted; -100 ignored) under the mixture."""
        past_key_values = pop_cache(kwargs, past_key_values)  # transformers >= 5.24 names it ``cache``
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("return_dict", None)
        layers = self.key_layers
        with contextlib.ExitStack() as stack:
            hooks = {layer: stack.enter_context(KeyHook(self.lm, layer)) for layer in layers}
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_ARG: past_key_values},
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
        logits = out.logits  # [B, L', V]
        if layers:
            keys = {layer: hook.keys[:, -logits.shape[1] :] for layer, hook in hooks.items()}  # the last L' positions
            logits = self.mix(logits, keys)
        loss = None
        if labels is not None:
            loss = mixed_nll(logits, labels, num_items)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{CACHE_FIELD: cache_of(out)},
        )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The base LM's own (its family's position ids, cache slicing ...)."""
        return self.lm.prepare_inputs_for_generation(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """save_pretrained with the sha256 of the LM's and the memory's weights recorded in the config (checked at
        load)."""
        if self.memory is not None and not MLP_MEMORY.saveable(self.memory):
            raise UsageError("only a float MLPMemory can be saved (not a quantised or compiled copy)")
        self.config.lm_weights_sha256 = weights_sha256(self.lm)
        self.config.memory_weights_sha256 = weights_sha256(self.memory) if self.memory is not None else None
        super().save_pretrained(save_directory, *args, **kwargs)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickled_weights(folder: Path) -> None:
    """UsageError naming the pickled weights file of a local folder that holds no safetensors weights."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(
            f"{folder} holds pickled weights ({pickles[0]}) and no model.safetensors: pickles are never loaded, "
            "only safetensors; re-export it (mlpmem export)"
        )


def mixed_nll(log_probs: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
    """Mean NLL of ``labels`` [B, T] under log-probs [B, T, V] (position t predicts labels[t + 1]; -100 ignored)."""
    pred = log_probs[:, :-1].reshape(-1, log_probs.shape[-1])  # [B*(T-1), V]
    gold = labels[:, 1:].reshape(-1).to(pred.device)
    reduction = "sum" if num_items is not None else "mean"
    loss = nn.functional.cross_entropy(pred, gold, ignore_index=-100, reduction=reduction)
    return loss / num_items if num_items is not None else loss


AutoModel.register(MemoryAugmentedConfig, MemoryAugmentedForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MemoryAugmentedConfig, MemoryAugmentedForCausalLM, exist_ok=True)
