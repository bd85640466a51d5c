"""Generation with the MLP memory (and/or kNN-LM) through transformers' own ``generate``.

    from mlpmem.inference.generation import MemoryAugmentedLM
    mlm = MemoryAugmentedLM.from_run("runs/demo")                 # base LM + memory, λ as tuned by evaluate
    print(mlm.generate("The history of", max_new_tokens=30, do_sample=True, top_p=0.9))

    mlpmem generate --run-dir runs/demo --prompt "The history of" --max-new-tokens 30

How (knn-transformers style, on an unmodified Hugging Face model): two forward hooks. The key hook
(``mlpmem.lm.keys.KeyHook``) keeps the key module's output of the current forward; a hook on the LM's top-level
forward replaces ``outputs.logits`` — only the positions that forward returns; ``generate`` asks for the last
one (``logits_to_keep=1``) — by the joint log-probs ``mix_log_probs([log p_LM, log p_mem, log p_kNN], weights)``.
Everything ``generate`` does afterwards (temperature, top-k, top-p and other logits processors, argmax, sampling,
beam search's log_softmax, which leaves log-probs unchanged) therefore acts on the mixed distribution. With the
KV cache each decode step forwards only the new token, so the memory (or the retrieval) runs once per new
token on that token's key and the prefix is never recomputed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mlpmem.artifacts import Stage, open_array, read_json, require_stage
from mlpmem.config import GenerateConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.inference.mixing import mix_log_probs
from mlpmem.lm.keys import KeyHook, key_dim, key_module_path
from mlpmem.lm.load import load_lm, load_tokenizer, run_lm_dir

DEFAULT_KNN_LMBDA = 0.25
DEFAULT_KNN_TEMPERATURE = 10.0
DEFAULT_MAX_NEW_TOKENS = 50


@dataclass
class KnnRetriever:
    """Live kNN-LM: search ``index`` for each key and aggregate the neighbours' values into p_kNN.

    ``values`` [N] are the datastore's next tokens (int; RAM or memmap); ``k`` neighbours, ``nprobe`` IVF lists
    (None: the index's own), ``temperature`` T of softmax(-d/T) over squared L2 distances.
    """

    index: Any
    values: np.ndarray
    k: int = 256
    temperature: float = DEFAULT_KNN_TEMPERATURE
    nprobe: int | None = None

    def log_probs(self, keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """keys [Q, d] -> log p_kNN [Q, V] float32 on the keys' device."""
        from mlpmem.knn.distribution import knn_log_probs_dense, neighbour_values
        from mlpmem.knn.search import search

        queries = keys.detach().float().cpu().numpy()  # [Q, d]
        dists, ids = search(self.index, queries, min(self.k, int(self.index.ntotal)), self.nprobe)  # [Q, k] each
        dense = knn_log_probs_dense(dists, neighbour_values(self.values, ids), self.temperature, vocab_size)
        return dense.to(keys.device)


class MemoryAugmentedLM:
    """A causal LM whose next-token distribution is mixed with an MLP memory and/or a kNN-LM.

    Weights: memory ``lmbda``, kNN-LM ``knn_lmbda``, the LM the rest (1 - lmbda - knn_lmbda). ``memory`` is any
    module mapping keys [..., d] to logits [..., V] (an ``MLPMemory``, or a quantised / compiled copy of one).

        mlm = MemoryAugmentedLM(lm, memory=memory, lmbda=0.25, tokenizer=tokenizer)
        mlm.generate(["Once upon", "The"], max_new_tokens=20)        # -> list of continuations (str)
        mlm.generate(input_ids, attention_mask=mask, num_beams=4)    # -> token ids, as model.generate
        mlm.joint_log_probs(input_ids)                               # -> [B, T, V] mixed log-probs
        with mlm.mixing():                                           # or any HF API on the LM itself
            mlm.lm.generate(input_ids, max_new_tokens=5)
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        memory: nn.Module | None = None,
        lmbda: float = 0.25,
        knn: KnnRetriever | None = None,
        knn_lmbda: float = 0.0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        key_layer: str | None = None,
    ):
        self.lm = lm
        self.memory = memory
        self.knn = knn
        self.lmbda = float(lmbda) if memory is not None else 0.0
        self.knn_lmbda = float(knn_lmbda) if knn is not None else 0.0
        if min(self.lmbda, self.knn_lmbda) < 0 or self.lmbda + self.knn_lmbda > 1:
            raise UsageError(f"--lmbda ({self.lmbda}) and --knn-lmbda ({self.knn_lmbda}) must be >= 0 and sum to at most 1")
        self.tokenizer = tokenizer
        self.key_layer = key_module_path(lm, key_layer)

    # construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        lmbda: float | None = None,
        use_memory: bool = True,
        use_knn: bool = False,
        k: int = 256,
        knn_temperature: float | None = None,
        knn_lmbda: float | None = None,
        nprobe: int | None = None,
        device: str = "auto",
    ) -> MemoryAugmentedLM:
        """The run's LM and tokenizer, its memory (``use_memory``) and/or its kNN-LM (``use_knn``).

        Defaults: ``lmbda``, ``knn_lmbda`` and ``knn_temperature`` are the values ``mlpmem evaluate`` tuned on
        valid when it ran (with this memory), else the λ saved with the memory, 0.25 and the targets' temperature.
        Mismatched artifacts (another base LM, key layer or width) are refused with one line.
        """
        run_dir = Path(run_dir)
        dev = resolve_device(device)
        lm_dir = run_lm_dir(run_dir)
        lm = load_lm(lm_dir, dev)
        model_fp = read_json(run_dir / "lm" / "manifest.json")["model_fingerprint"]
        tokenizer = _load_tokenizer_if_any(lm_dir)
        tuned = _tuned_values(run_dir, use_memory and use_knn)

        memory, key_layer = None, None
        if use_memory:
            from mlpmem.memory.model import check_pairing, load_memory

            memory = load_memory(run_dir, dev)
            key_layer = key_module_path(lm, memory.config.key_layer)
            check_pairing(memory.config, model_fp, key_layer, key_dim(lm, key_layer))
            if memory.config.vocab_size != lm.config.vocab_size:
                raise UsageError(f"the memory predicts {memory.config.vocab_size} tokens, the LM {lm.config.vocab_size}")
            lmbda = tuned.get("lmbda", memory.config.lmbda) if lmbda is None else lmbda
        knn = None
        if use_knn:
            knn, knn_key_layer = _load_knn(run_dir, model_fp, k, nprobe)
            if key_layer is not None and knn_key_layer != key_layer:
                raise UsageError(f"the memory reads keys from {key_layer!r}, the datastore from {knn_key_layer!r}")
            key_layer = knn_key_layer
            knn.temperature = knn_temperature or tuned.get("knn_temperature") or (
                memory.config.knn_temperature if memory is not None and memory.config.knn_temperature else None
            ) or _targets_temperature(run_dir)
            knn_lmbda = tuned.get("knn_lmbda", DEFAULT_KNN_LMBDA) if knn_lmbda is None else knn_lmbda
        if not use_memory and not use_knn:
            raise UsageError("nothing to mix: give use_memory and/or use_knn (--memory / --knn)")
        return cls(lm, memory, lmbda or 0.0, knn, knn_lmbda or 0.0, tokenizer, key_layer)

    # mixing ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    def mix(self, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """LM logits [B, L, V] and keys [B, L, d] of the same positions -> joint log-probs [B, L, V] float32."""
        components = [torch.log_softmax(logits.float(), dim=-1)]
        weights = [1.0 - self.lmbda - self.knn_lmbda]
        if self.lmbda > 0:
            components.append(torch.log_softmax(self.memory(keys).float(), dim=-1))  # [B, L, V]
            weights.append(self.lmbda)
        if self.knn_lmbda > 0:
            flat = self.knn.log_probs(keys.reshape(-1, keys.shape[-1]), logits.shape[-1])  # [B*L, V]
            components.append(flat.view(*logits.shape))
            weights.append(self.knn_lmbda)
        return mix_log_probs(components, weights)

    @contextlib.contextmanager
    def mixing(self) -> Iterator[MemoryAugmentedLM]:
        """Within this block every forward of ``self.lm`` returns joint log-probs in place of its logits."""
        key_hook = KeyHook(self.lm, self.key_layer)

        def replace_logits(_module: nn.Module, _args: tuple, output: Any) -> Any:
            logits = output.logits if hasattr(output, "logits") else output[0]  # [B, L', V], L' <= L
            keys = key_hook.keys[:, -logits.shape[1] :]  # [B, L', d]: the returned positions are the last ones
            with torch.no_grad():
                mixed = self.mix(logits, keys)
            if hasattr(output, "logits"):
                output.logits = mixed
                return output
            return (mixed, *output[1:])

        with key_hook:
            handle = self.lm.register_forward_hook(replace_logits)
            try:
                yield self
            finally:
                handle.remove()

    @torch.inference_mode()
    def joint_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Joint log-probs [B, T, V] of the next token at every position of ``input_ids`` [B, T] (one forward)."""
        with self.mixing():
            out = self.lm(input_ids=input_ids.to(self.device), attention_mask=_to(attention_mask, self.device), use_cache=False)
        return out.logits

    # generation ------------------------------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | torch.Tensor, **generate_kwargs: Any) -> Any:
        """Generate with ``transformers``' own ``generate`` on the mixed distribution.

        ``prompts``: a string or a list of strings (left-padded into one batch; returns the continuation text,
        a string or a list of strings), or ``input_ids`` [B, T] (pass ``attention_mask`` for left-padded rows;
        returns what ``model.generate`` returns: token ids [B, T + new] by default). ``generate_kwargs`` are
        ``model.generate``'s: ``max_new_tokens`` (default 50), ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``num_beams``, ``num_return_sequences``, ``repetition_penalty``, ``use_cache`` ...
        """
        generate_kwargs.setdefault("pad_token_id", self._pad_token_id())
        if "max_length" not in generate_kwargs:
            generate_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(prompts, torch.Tensor):
            with self.mixing(), torch.inference_mode():
                return self.lm.generate(prompts.to(self.device), **_moved(generate_kwargs, self.device))
        if self.tokenizer is None:
            raise UsageError("this LM has no tokenizer in its folder; pass input_ids instead of text")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or any(not t for t in texts):
            raise UsageError("--prompt must be a non-empty text")
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with self.mixing(), torch.inference_mode():
            out = self.lm.generate(
                batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device), **generate_kwargs
            )
        sequences = out.sequences if hasattr(out, "sequences") else out  # [B * n_return, T + new]
        new = sequences[:, batch["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return decoded[0] if isinstance(prompts, str) and len(decoded) == 1 else decoded

    def _pad_token_id(self) -> int | None:
        for source in (self.tokenizer, self.lm.generation_config, self.lm.config):
            for attr in ("pad_token_id", "eos_token_id"):
                value = getattr(source, attr, None) if source is not None else None
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
        return None


# loading helpers ---------------------------------------------------------------------------------------------
def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


def _moved(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _load_tokenizer_if_any(lm_dir: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved next to the LM (left padding for batched generation), or None when there is none."""
    if not any((lm_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    tokenizer = load_tokenizer(lm_dir)
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tuned_values(run_dir: Path, joint: bool) -> dict[str, float]:
    """λ (memory, when evaluated with this memory), kNN λ and T tuned by a complete ``mlpmem evaluate`` of the run."""
    manifest = Stage(run_dir, "evaluate").read()
    path = run_dir / "evaluate" / "results.json"
    if not manifest or manifest.get("status") != "complete" or not path.is_file():
        return {}
    try:
        systems = {s["name"]: s for s in json.loads(path.read_text(encoding="utf-8"))["systems"]}
    except (ValueError, KeyError, TypeError):
        return {}
    out: dict[str, float] = {}
    memory = Stage(run_dir, "memory").read()
    same_memory = memory is not None and manifest["inputs"].get("memory") == memory.get("fingerprint")
    if same_memory and systems.get("mlp-memory"):
        out["lmbda"] = systems["mlp-memory"]["lambda"]
    knn = systems.get("knn-lm")
    if knn:
        out.update(knn_lmbda=knn["lambda"], knn_temperature=knn["temperature"])
    both = systems.get("mlp-memory+knn-lm")
    if joint and both and "weights" in both:
        out["knn_lmbda"] = both["weights"]["knn-lm"]
        if same_memory:
            out["lmbda"] = both["weights"]["mlp-memory"]
    return out


def _targets_temperature(run_dir: Path) -> float:
    manifest = Stage(run_dir, "targets").read()
    if manifest and manifest.get("status") == "complete":
        return float(manifest["config"].get("knn_temperature", DEFAULT_KNN_TEMPERATURE))
    return DEFAULT_KNN_TEMPERATURE


def _load_knn(run_dir: Path, model_fp: str, k: int, nprobe: int | None) -> tuple[KnnRetriever, str]:
    """The run's index and datastore values as a retriever, and the datastore's key layer."""
    from mlpmem.knn.index import load_index

    datastore = require_stage(run_dir, "datastore", f"mlpmem datastore --run-dir {run_dir}")
    if datastore.get("model_fingerprint") != model_fp:
        raise UsageError("the run's datastore was built with another model than the run's LM; rebuild it (mlpmem datastore)")
    index, _ = load_index(run_dir, datastore)
    values = np.asarray(open_array(run_dir, "datastore", "values"))  # [N] int32, in RAM: one gather per step
    return KnnRetriever(index, values, k=k, nprobe=nprobe), datastore["key_layer"]


def generate_from_config(config: GenerateConfig) -> dict[str, Any]:
    """``mlpmem generate``: load the run's mixed model, generate, print each continuation after its prompt."""
    if not config.prompt:
        raise UsageError("give --prompt TEXT")
    mlm = MemoryAugmentedLM.from_run(
        config.run_dir, lmbda=config.lmbda, use_memory=config.memory, use_knn=config.knn, k=config.k,
        knn_temperature=config.knn_temperature, knn_lmbda=config.knn_lmbda, nprobe=config.nprobe, device=config.device,
    )
    prompts = [config.prompt] if isinstance(config.prompt, str) else list(config.prompt)
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens, "num_beams": config.num_beams,
        "num_return_sequences": config.num_return_sequences, "do_sample": config.do_sample,
    }
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_k=config.top_k or 0, top_p=config.top_p or 1.0)
    if config.repetition_penalty is not None:
        kwargs["repetition_penalty"] = config.repetition_penalty
    if config.num_return_sequences > config.num_beams and not config.do_sample:
        raise UsageError("--num-return-sequences must be <= --num-beams without --do-sample")
    torch.manual_seed(config.seed)
    outputs = mlm.generate(prompts, **kwargs)
    per_prompt = config.num_return_sequences
    mixed = [f"memory λ={mlm.lmbda:g}"] * bool(mlm.memory is not None) + [f"kNN-LM λ={mlm.knn_lmbda:g}"] * bool(mlm.knn)
    print(f"# {', '.join(mixed)}", file=sys.stderr)
    for i, prompt in enumerate(prompts):
        for text in outputs[i * per_prompt : (i + 1) * per_prompt]:
            print(f"{prompt}{text if text.startswith((' ', chr(10))) or not text else ' ' + text}")
    return {"prompts": prompts, "outputs": outputs, "lmbda": mlm.lmbda, "knn_lmbda": mlm.knn_lmbda}
