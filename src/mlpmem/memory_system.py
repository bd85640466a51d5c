"""What a memory system is to the shared code: its names, and the small typed interface a system package exports.

``SystemName`` is the one vocabulary of systems: result rows (``EvaluateManifest.systems``), the components
evaluate scores and mixes (``parts[split][name]``), bench rows and the CLI all use these values.

A system package (``mlpmem.knn``, ``mlpmem.memory``, ``mlpmem.explicit``, and the next one) exports one object
satisfying ``MemorySystem``; ``mlpmem.systems`` registers it, and evaluate, generate, bench and export iterate over
that registry, never importing a system package themselves.

A system that reads the LM's keys contributes ``Component``s: per-position next-token distributions from the keys
of one LM module (the MLP memory: an MLP on the keys; kNN-LM: a search with them). The shared code mixes any set
of components with the LM in log space (``mlpmem.inference.mixing``): evaluate per scored position, the joint
model (``mlpmem.inference.joint``) per generated token. A mixture of several systems' components (e.g.
``mlp-memory+knn-lm``) is a result row, not a system.

This module sits in the core, below the system packages, so they can build the value types below; it imports no
system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from mlpmem.artifacts import RunDir
    from mlpmem.config import BenchConfig, EvaluateConfig, GenerateConfig


class SystemName(StrEnum):
    """Every system a table, a manifest or a bench row names (the value is what is printed and stored)."""

    BASE = "base"
    KNN_LM = "knn-lm"
    MLP_MEMORY = "mlp-memory"
    MLP_MEMORY_KNN_LM = "mlp-memory+knn-lm"
    EXPLICIT_MEMORY = "explicit-memory"
    EXPLICIT_CONTROL = "explicit-control"
    EXPLICIT_MEMORY_MLP_MEMORY = "explicit-memory+mlp-memory"
    EXPLICIT_NO_MEMORY = "explicit-no-memory"  # bench: the explicit-memory LM reading no memory
    DECODER_EQUAL_PARAMS = "decoder-equal-params"  # bench: a decoder with the parameters of base + memory


@dataclass(frozen=True)
class ResultRow:
    """One row a system adds to the evaluate table: the perplexity of component ``part`` alone, or, with
    ``mixed_with``, of ``part`` mixed with those components (weights tuned on the tuning split, as every mixture:
    one other component, λ; two, both weights on a grid). A component scored over a grid of settings (kNN-LM's
    temperatures: log-probs [N, G]) has its column (T) chosen by its own row, which comes first; later rows use it."""

    name: SystemName
    part: SystemName
    mixed_with: tuple[SystemName, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.mixed_with, str):  # ResultRow(name, part, other): one component
            object.__setattr__(self, "mixed_with", (self.mixed_with,))


class Component(Protocol):
    """A next-token distribution at every position, computed from the LM's keys at the module ``layer``."""

    layer: str

    def log_probs(self, keys: torch.Tensor, vocab: int) -> torch.Tensor:
        """keys [..., d] -> log-probs [..., V] float32 on the keys' device (the joint model, per token)."""
        ...

    def gold_log_probs(self, keys: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """keys [N, d] float32, gold [N] -> log p(gold) [N] float32, or [N, G] over evaluate's temperature grid
        (``EvaluateConfig.knn_temperatures``; its row tunes T with λ), per scored position."""
        ...


class SystemEvaluation(Protocol):
    """A system opened for ``mlpmem evaluate`` (its weights loaded, checked)."""

    plain_lms: dict[SystemName, PreTrainedModel]
    """Components that are a plain causal LM, scored by evaluate's shared sliding-window core."""

    components: dict[SystemName, Component]
    """Components on the evaluated LM's keys: evaluate collects their layers' keys in its one LM pass per split."""

    def score(self, tokens: np.ndarray, context: int, stride: int, split: str) -> dict[SystemName, np.ndarray]:
        """log p(gold) [N] of its own components at the positions the sliding windows score."""
        ...

    def manifest_fields(self) -> dict[str, Any]:
        """Fields of the evaluate manifest it measured (after scoring)."""
        ...


@dataclass
class KeyComponentsEvaluation:
    """A ``SystemEvaluation`` whose components all read the evaluated LM's keys (kNN-LM, the MLP memory): evaluate
    scores them in its shared pass, so there is nothing of its own to score or to record."""

    components: dict[SystemName, Component]
    plain_lms: dict[SystemName, PreTrainedModel] = field(default_factory=dict)

    def score(self, tokens: np.ndarray, context: int, stride: int, split: str) -> dict[SystemName, np.ndarray]:
        return {}

    def manifest_fields(self) -> dict[str, Any]:
        return {}


class MixedThroughTheJointModel:
    """The ``MemorySystem`` methods of a system that generates only as a component of the joint model (kNN-LM, the
    MLP memory) and whose bench rows are bench's own."""

    def generates(self, config: GenerateConfig) -> bool:
        return False

    def generate(self, config: GenerateConfig, prompts: list[str], kwargs: dict[str, Any]) -> tuple[list[str], str]:
        raise NotImplementedError("generates through the joint model")

    def bench(self, run: RunDir, prompt: torch.Tensor, config: BenchConfig, device: torch.device) -> None:
        return None

    def bench_lines(self, section: dict[str, Any]) -> list[str]:
        return []


class MemorySystem(Protocol):
    """How the shared commands reach one memory system. Every method answers for a run that may not have the
    system: None (or an empty list) then."""

    name: str
    components: dict[SystemName, str]
    """The components it scores in evaluate, with how errors name them ("the explicit-memory LM")."""
    key_components: frozenset[SystemName]
    """Those of its components read from the evaluated LM's keys (``Component``): mixed with the LM, so their
    weights are tuned; their log-probs may be -inf (the gold token out of reach), never NaN."""

    # mlpmem evaluate
    def evaluation_inputs(self, config: EvaluateConfig, run: RunDir, model_fp: str) -> dict[str, str] | None:
        """The fingerprints of the stages it reads when it takes part in this evaluation of the LM ``model_fp``
        (manifests only, checked), else None."""
        ...

    def built_from(self, run: RunDir) -> str | None:
        """The split its stores were built from (a split scored there is recall, not held-out), else None."""
        ...

    def open_evaluation(
        self, config: EvaluateConfig, run: RunDir, device: torch.device, lm: PreTrainedModel, model_fp: str
    ) -> SystemEvaluation:
        """Its weights loaded and checked against the evaluated LM ``lm`` (fingerprint ``model_fp``)."""
        ...

    def result_rows(self, components: set[str], tuned_on: str | None) -> list[ResultRow]:
        """Its rows, given the components scored on every split and the split mixtures are tuned on."""
        ...

    # mlpmem generate
    def generates(self, config: GenerateConfig) -> bool:
        """Whether this config asks this system to generate (instead of the LM + MLP memory / kNN-LM)."""
        ...

    def generate(self, config: GenerateConfig, prompts: list[str], kwargs: dict[str, Any]) -> tuple[list[str], str]:
        """(the continuations, ``num_return_sequences`` per prompt in order; what generated them, in words)."""
        ...

    # scoring models: one HF causal LM per row (mlpmem.inference.scoring_models)
    def scoring_models(self, run: RunDir, evaluated: Any, device: torch.device) -> dict[SystemName, nn.Module]:
        """Its rows that are a model of their own (not a mixture on the base LM's keys), each following the HF
        causal-LM contract: ``model(input_ids=ids [B, T]).logits`` [B, T, V] whose log_softmax is the row's
        next-token log-probs (the protocol ``evaluated``, the run's ``EvaluateManifest``, scored them with)."""
        ...

    def joint_component(self, run: RunDir, lm: PreTrainedModel, model_fp: str, options: dict[str, Any]) -> Any:
        """Its part of the joint model (``MemoryAugmentedForCausalLM.from_parts`` keyword arguments: the module or
        retriever, its layer, its settings) for ``lm`` of the run, or None when it has none. ``options``: the
        generate / export settings (``k``, ``nprobe``, ``knn_temperature``, ``memory_dtype``, ``device``) and the
        tuned values evaluate recorded (``tuned``)."""
        ...

    # mlpmem bench
    def bench(
        self, run: RunDir, prompt: torch.Tensor, config: BenchConfig, device: torch.device
    ) -> dict[str, Any] | None:
        """Its section of bench.json (under ``name``), None when the run lacks the system."""
        ...

    def bench_lines(self, section: dict[str, Any]) -> list[str]:
        """The bench report's lines for its section."""
        ...
