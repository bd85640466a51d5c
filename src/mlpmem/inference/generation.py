"""Generation with the MLP memory (and/or kNN-LM) through transformers' own ``generate``.

    from mlpmem.inference.generation import MemoryAugmentedLM
    mlm = MemoryAugmentedLM.from_run("runs/demo")                 # base LM + memory, λ as tuned by evaluate
    print(mlm.generate("The history of", max_new_tokens=30, do_sample=True, top_p=0.9))

    mlpmem generate --run-dir runs/demo --prompt "The history of" --max-new-tokens 30
    mlpmem generate --run-dir runs/demo --prompt '["The", "In"]'     # a YAML list: one left-padded batch

How: ``MemoryAugmentedLM`` holds the joint model, ``mlpmem.inference.joint.MemoryAugmentedForCausalLM`` (a
native HF causal LM whose ``forward`` returns the joint log-probs ``mix_log_probs([log p_LM, log p_mem, log p_kNN],
weights)`` in place of the logits), and calls its own ``generate``: temperature, top-k, top-p and other logits
processors, argmax, sampling and beam search (whose log_softmax leaves log-probs unchanged) act on the mixed
distribution; with the KV cache each decode step forwards only the new token, so the memory (or the retrieval)
runs once per new token on that token's key and the prefix is never recomputed. This class adds text in and out,
the tokenizer, λ defaults from the run, and the length check.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mlpmem.artifacts import RunDir
from mlpmem.config import GenerateConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.inference.joint import MemoryAugmentedForCausalLM
from mlpmem.lm.load import load_lm, load_tokenizer, max_positions, run_lm_dir
from mlpmem.memory_system import SystemName
from mlpmem.systems import SYSTEMS

DEFAULT_MAX_NEW_TOKENS = 50


class MemoryAugmentedLM:
    """Text in, text out around the joint model (``MemoryAugmentedForCausalLM``, a native HF causal LM): the run's
    LM, memory and/or kNN-LM, and its tokenizer.

    Weights: memory ``lmbda``, kNN-LM ``knn_lmbda``, the LM the rest (1 - lmbda - knn_lmbda). ``memory`` is any
    module mapping keys [..., d] to logits [..., V] (an ``MLPMemory``, or a quantised / compiled copy of one); it
    reads the output of ``memory_layer`` (default: ``memory.config.key_layer``, else the last block's feed-forward
    input), the kNN-LM queries come from ``knn_layer`` (default: the last block's feed-forward input).

        mlm = MemoryAugmentedLM(lm, memory=memory, lmbda=0.25, tokenizer=tokenizer)
        mlm.generate(["Once upon", "The"], max_new_tokens=20)        # -> list of continuations (str)
        mlm.generate(input_ids, attention_mask=mask, num_beams=4)    # -> token ids, as model.generate
        mlm.joint_log_probs(input_ids)                               # -> [B, T, V] mixed log-probs
        mlm.model                                                    # the joint model: any HF API works on it
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        memory: nn.Module | None = None,
        lmbda: float = 0.25,
        knn: Any = None,
        knn_lmbda: float = 0.0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        memory_layer: str | None = None,
        knn_layer: str | None = None,
        model: MemoryAugmentedForCausalLM | None = None,
    ):
        self.model = model or MemoryAugmentedForCausalLM.from_parts(
            lm, memory, lmbda, knn, knn_lmbda, memory_layer=memory_layer, knn_layer=knn_layer
        )
        self.tokenizer = tokenizer

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
        memory_dtype: str = "fp32",
    ) -> MemoryAugmentedLM:
        """The run's LM and tokenizer, its memory (``use_memory``) and/or its kNN-LM (``use_knn``); neither: the
        base LM alone.

        Defaults: ``lmbda``, ``knn_lmbda`` and ``knn_temperature`` are the values ``mlpmem evaluate`` tuned on
        valid (read from its manifest, and only when it evaluated this LM with this memory / datastore), else the
        λ saved with the memory, 0.25 and the temperature of the run's kNN targets. Mismatched
        artifacts (another base LM, a key module the LM lacks, another width or vocabulary) are refused with one line.
        ``memory_dtype`` (fp32, bf16, int8) sets the memory's weights (``mlpmem.memory.quantize``).
        """
        model = joint_model_from_run(
            run_dir,
            lmbda,
            use_memory,
            use_knn,
            k,
            knn_temperature,
            knn_lmbda,
            nprobe,
            resolve_device(device),
            memory_dtype,
        )
        return cls(model.lm, model=model, tokenizer=_load_tokenizer_if_any(run_lm_dir(Path(run_dir))))

    # the joint model's parts -----------------------------------------------------------------------------------
    @property
    def lm(self) -> PreTrainedModel:
        return self.model.lm

    @property
    def memory(self) -> nn.Module | None:
        return self.model.memory

    @property
    def knn(self) -> Any:
        """The kNN-LM retriever (a ``KnnRetriever``), or None."""
        return self.model.knn

    @property
    def lmbda(self) -> float:
        return self.model.lmbda

    @property
    def knn_lmbda(self) -> float:
        return self.model.knn_lmbda

    @property
    def memory_layer(self) -> str | None:
        return self.model.memory_layer

    @property
    def knn_layer(self) -> str | None:
        return self.model.knn_layer

    @property
    def key_layers(self) -> list[str]:
        return self.model.key_layers

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    @torch.inference_mode()
    def joint_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Joint log-probs [B, T, V] of the next token at every position of ``input_ids`` [B, T] (one forward)."""
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=_to(attention_mask, self.device), use_cache=False
        )
        if not self.key_layers:
            return torch.log_softmax(out.logits.float(), dim=-1)
        return out.logits

    # generation ------------------------------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | torch.Tensor, **generate_kwargs: Any) -> Any:
        """Generate with ``transformers``' own ``generate`` on the mixed distribution.

        ``prompts``: a string or a list of strings (left-padded into one batch; returns the continuation text,
        a string or a list of strings), or ``input_ids`` [B, T] (pass ``attention_mask`` for left-padded rows;
        returns what ``model.generate`` returns: token ids [B, T + new] by default). ``generate_kwargs`` are
        ``model.generate``'s: ``max_new_tokens`` (default 50), ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``num_beams``, ``num_return_sequences``, ``repetition_penalty``, ``use_cache`` ...
        A prompt plus new tokens beyond the model's positions is refused.
        """
        generate_kwargs.setdefault("pad_token_id", self._pad_token_id())
        if "max_length" not in generate_kwargs:
            generate_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(prompts, torch.Tensor):
            self.check_length(prompts.shape[-1], generate_kwargs)
            with torch.inference_mode():
                return self.model.generate(prompts.to(self.device), **_moved(generate_kwargs, self.device))
        if self.tokenizer is None:
            raise UsageError("this LM has no tokenizer in its folder; pass input_ids instead of text")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise UsageError("every prompt must be a non-empty text", field="prompt")
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        if (batch["attention_mask"].sum(1) == 0).any():
            raise UsageError("a prompt gives no tokens with this tokenizer", field="prompt")
        self.check_length(batch["input_ids"].shape[1], generate_kwargs)
        with torch.inference_mode():
            out = self.model.generate(
                batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                **generate_kwargs,
            )
        sequences = out.sequences if hasattr(out, "sequences") else out  # [B * n_return, T + new]
        new = sequences[:, batch["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return decoded[0] if isinstance(prompts, str) and len(decoded) == 1 else decoded

    def check_length(self, prompt_tokens: int, generate_kwargs: dict[str, Any]) -> None:
        """UsageError when the prompt plus the tokens to generate exceed the model's positions."""
        positions = max_positions(self.lm)
        if "max_length" in generate_kwargs:
            total, asked = int(generate_kwargs["max_length"]), f"max_length {generate_kwargs['max_length']}"
        else:
            new = int(generate_kwargs["max_new_tokens"])
            total, asked = (
                prompt_tokens + new,
                f"the prompt ({prompt_tokens} tokens) + {new} new tokens = {prompt_tokens + new}",
            )
        if positions is not None and total > positions:
            raise UsageError(
                f"{asked} exceeds the model's {positions} positions; shorten the prompt or ask for fewer new tokens",
                field="max_new_tokens",
            )

    def _pad_token_id(self) -> int | None:
        for source in (self.tokenizer, self.lm.generation_config, self.lm.config):
            for attr in ("pad_token_id", "eos_token_id"):
                value = getattr(source, attr, None) if source is not None else None
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
        return None

    def describe(self) -> str:
        """What is mixed, e.g. 'memory λ=0.7, kNN-LM λ=0.15 (T=10)', or 'base LM alone'."""
        parts = [f"memory λ={self.lmbda:g}"] if self.memory is not None else []
        if self.knn is not None:
            parts.append(f"kNN-LM λ={self.knn_lmbda:g} (T={self.knn.temperature:g})")
        return ", ".join(parts) if parts else "base LM alone"


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


def joint_model_from_run(
    run_dir: str | Path,
    lmbda: float | None = None,
    use_memory: bool = True,
    use_knn: bool = False,
    k: int = 256,
    knn_temperature: float | None = None,
    knn_lmbda: float | None = None,
    nprobe: int | None = None,
    device: torch.device | str = "cpu",
    memory_dtype: str = "fp32",
) -> MemoryAugmentedForCausalLM:
    """The run's joint model (see ``MemoryAugmentedLM.from_run`` for the defaults and the refusals): each registered
    system adds its part (``MemorySystem.joint_component``)."""
    run = RunDir(run_dir)
    model_fp = run.require("train-lm").model_fingerprint
    lm = load_lm(run_lm_dir(run.path), device)
    options = dict(
        use_memory=use_memory,
        use_knn=use_knn,
        lmbda=lmbda,
        k=k,
        knn_temperature=knn_temperature,
        knn_lmbda=knn_lmbda,
        nprobe=nprobe,
        device=device,
        memory_dtype=memory_dtype,
        tuned=tuned_values(run, model_fp, use_memory, use_knn),
    )
    parts: dict[str, Any] = {}
    options["parts"] = parts  # a later system's part may refine an earlier one's default
    for system in SYSTEMS:
        parts.update(system.joint_component(run, lm, model_fp, options) or {})
    parts["lmbda"], parts["knn_lmbda"] = parts.get("lmbda") or 0.0, parts.get("knn_lmbda") or 0.0
    return MemoryAugmentedForCausalLM.from_parts(lm, **parts, base_model_fingerprint=model_fp)


@dataclass
class TunedValues:
    """What ``mlpmem evaluate`` tuned for the artifacts in use (None: not tuned for them)."""

    lmbda: float | None = None
    knn_lmbda: float | None = None
    knn_temperature: float | None = None


def tuned_values(run: RunDir, model_fp: str, memory: bool, knn: bool) -> TunedValues:
    """λ of the memory, λ and T of kNN-LM tuned by the run's complete evaluate stage, each only when that
    evaluation scored this LM with the current memory (train-memory fingerprint) / datastore and index. With
    both, the weights of the combined system."""
    evaluate = run.complete("evaluate")
    if evaluate is None or evaluate.inputs.get("model") != model_fp:
        return TunedValues()

    def current(stage: str) -> bool:
        manifest = run.complete(stage)
        return manifest is not None and evaluate.inputs.get(stage) == manifest.fingerprint

    same_memory = memory and current("train-memory")
    same_knn = knn and current("datastore") and current("index")
    out = TunedValues()
    mem_row, knn_row, both = (
        evaluate.system(SystemName.MLP_MEMORY),
        evaluate.system(SystemName.KNN_LM),
        evaluate.system(SystemName.MLP_MEMORY_KNN_LM),
    )
    if same_knn and knn_row is not None:
        out.knn_temperature = knn_row.temperature
    if memory and knn:
        if same_memory and same_knn and both is not None and both.weights:
            out.lmbda, out.knn_lmbda = both.weights[SystemName.MLP_MEMORY], both.weights[SystemName.KNN_LM]
        return out
    if same_memory and mem_row is not None:
        out.lmbda = mem_row.lmbda
    if same_knn and knn_row is not None:
        out.knn_lmbda = knn_row.lmbda
    return out


# mlpmem generate -----------------------------------------------------------------------------------------------
@dataclass
class Generations:
    """What ``mlpmem generate`` produced: ``outputs`` holds ``per_prompt`` continuations per prompt, in order."""

    prompts: list[str]
    outputs: list[str]
    per_prompt: int
    mixed: str  # MemoryAugmentedLM.describe()
    lmbda: float
    knn_lmbda: float


def generate_kwargs(config: GenerateConfig) -> dict[str, Any]:
    """transformers' generate arguments of a generate config."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "num_beams": config.num_beams,
        "num_return_sequences": config.num_return_sequences,
        "do_sample": config.do_sample,
    }
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_k=config.top_k or 0, top_p=config.top_p or 1.0)
    if config.repetition_penalty is not None:
        kwargs["repetition_penalty"] = config.repetition_penalty
    return kwargs


def generate_from_config(config: GenerateConfig) -> Generations:
    """``mlpmem generate``: load the run's mixed model (or the base LM alone) and continue each prompt."""
    prompts = [config.prompt] if isinstance(config.prompt, str) else list(config.prompt or [])
    if not prompts:
        raise UsageError("give a prompt to continue (a text, or a YAML list of texts)", field="prompt")
    if config.num_return_sequences > config.num_beams and not config.do_sample:
        raise UsageError("must be <= --num-beams without --do-sample", field="num_return_sequences")
    for system in SYSTEMS:
        if system.generates(config):  # a registered system generates instead of the LM + MLP memory / kNN-LM
            outputs, described = system.generate(config, prompts, generate_kwargs(config))
            return Generations(prompts, outputs, config.num_return_sequences, described, 0.0, 0.0)
    mlm = MemoryAugmentedLM.from_run(
        config.run_dir,
        lmbda=config.lmbda,
        use_memory=config.memory,
        use_knn=config.knn,
        k=config.k,
        knn_temperature=config.knn_temperature,
        knn_lmbda=config.knn_lmbda,
        nprobe=config.nprobe,
        device=config.device,
        memory_dtype=config.memory_dtype,
    )
    torch.manual_seed(config.seed)
    outputs = mlm.generate(prompts, **generate_kwargs(config))
    outputs = [outputs] if isinstance(outputs, str) else list(outputs)
    return Generations(prompts, outputs, config.num_return_sequences, mlm.describe(), mlm.lmbda, mlm.knn_lmbda)


def print_generations(result: Generations, config: GenerateConfig | None = None) -> None:
    """Each continuation after its prompt on stdout, without the trailing blank lines or spaces a model may
    generate (the returned texts keep them); what was mixed on stderr."""
    print(f"# {result.mixed}", file=sys.stderr)
    for i, prompt in enumerate(result.prompts):
        for text in result.outputs[i * result.per_prompt : (i + 1) * result.per_prompt]:
            text = text.rstrip()
            print(f"{prompt}{text if text.startswith((' ', chr(10))) or not text else ' ' + text}")
