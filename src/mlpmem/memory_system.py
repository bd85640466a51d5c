"""What a memory system is to the shared code: its names, and the small typed interface a system package exports.

``SystemName`` is the one vocabulary of systems: result rows (``EvaluateManifest.systems``), the components
evaluate scores and mixes (``parts[split][name]``), bench rows and the CLI all use these values.

A system package (``mlpmem.explicit``, and the next one) exports one object satisfying ``MemorySystem``;
``mlpmem.systems`` registers it, and evaluate, generate and bench iterate over that registry, never importing a
system package themselves. This module sits in the core, below the system packages, so they can build the
value types below; it imports no system.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
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
    ``mixed_with``, of ``part`` mixed with that component (λ tuned on the tuning split, as every mixture)."""

    name: SystemName
    part: SystemName
    mixed_with: SystemName | None = None


class SystemEvaluation(Protocol):
    """A system opened for ``mlpmem evaluate`` (its weights loaded, checked)."""

    plain_lms: dict[SystemName, PreTrainedModel]
    """Components that are a plain causal LM, scored by evaluate's shared sliding-window core."""

    def score(self, tokens: np.ndarray, context: int, stride: int, split: str) -> dict[SystemName, np.ndarray]:
        """log p(gold) [N] of its own components at the positions the sliding windows score."""
        ...

    def manifest_fields(self) -> dict[str, Any]:
        """Fields of the evaluate manifest it measured (after scoring)."""
        ...


class MemorySystem(Protocol):
    """How the shared commands reach one memory system. Every method answers for a run that may not have the
    system: None (or an empty list) then."""

    name: str
    components: dict[SystemName, str]
    """The components it scores in evaluate, with how errors name them ("the explicit-memory LM")."""

    # mlpmem evaluate
    def evaluation_inputs(self, config: EvaluateConfig, run: RunDir) -> dict[str, str] | None:
        """The fingerprints of the stages it reads when it takes part in this evaluation (manifests only), else
        None."""
        ...

    def open_evaluation(self, config: EvaluateConfig, run: RunDir, device: torch.device) -> SystemEvaluation: ...

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

    # mlpmem bench
    def bench(
        self, run: RunDir, prompt: torch.Tensor, config: BenchConfig, device: torch.device
    ) -> dict[str, Any] | None:
        """Its section of bench.json (under ``name``), None when the run lacks the system."""
        ...

    def bench_lines(self, section: dict[str, Any]) -> list[str]:
        """The bench report's lines for its section."""
        ...
