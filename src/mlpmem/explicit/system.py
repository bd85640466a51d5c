"""Explicit memory as the shared commands see it: ``EXPLICIT``, the package's ``MemorySystem`` (registered in
``mlpmem.systems``).

    mlpmem evaluate --run-dir runs/explicit-demo      # rows explicit-memory, explicit-control (+ mlp-memory)
    mlpmem generate --run-dir runs/explicit-demo --explicit --prompt "The castle was"
    mlpmem bench --run-dir runs/explicit-demo         # the "explicit" section of bench.json

Evaluate scores the explicit-memory LM with its own reading protocol (``mlpmem.explicit.scoring``) and its
no-memory control as a plain LM; the explicit-memory LM is also mixed with the run's MLP memory when evaluate
scored one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlpmem.memory_system import ResultRow, SystemName

STAGE = "train-explicit"


@dataclass
class ExplicitEvaluation:
    """The run's explicit-memory LM (and its control) opened for ``mlpmem evaluate``."""

    reader: Any  # an ExplicitReader
    plain_lms: dict[SystemName, Any] = field(default_factory=dict)
    components: dict[SystemName, Any] = field(default_factory=dict)  # none on the base LM's keys

    def score(self, tokens: np.ndarray, context: int, stride: int, split: str) -> dict[SystemName, np.ndarray]:
        from mlpmem.explicit.scoring import explicit_log_probs

        return {
            SystemName.EXPLICIT_MEMORY: explicit_log_probs(self.reader, tokens, context, stride, f"explicit {split}")
        }

    def manifest_fields(self) -> dict[str, Any]:
        mass = self.reader.mass  # attention on memory tokens, per memory layer and window
        return {"memory_mass": round(float(np.mean(mass)), 4) if mass else None}


class ExplicitSystem:
    """Explicit memory (Memory3): an LM continued reading the sparse key/values of retrieved references."""

    name = "explicit"
    components = {
        SystemName.EXPLICIT_MEMORY: "the explicit-memory LM",
        SystemName.EXPLICIT_CONTROL: "the explicit-memory control",
    }
    key_components = frozenset()  # its LMs read memories of their own, not the evaluated LM's keys

    # mlpmem evaluate
    def evaluation_inputs(self, config, run, model_fp) -> dict[str, str] | None:
        """Only on the run's own LM and tokens (``--model`` and ``--corpus`` leave it out)."""
        if not config.explicit or config.corpus is not None or config.model is not None:
            return None
        if run.complete(STAGE) is None:
            return None
        return {STAGE: run.require(STAGE).fingerprint}

    def built_from(self, run) -> str | None:
        return None

    def open_evaluation(self, config, run, device, lm, model_fp) -> ExplicitEvaluation:
        from mlpmem.explicit.scoring import ExplicitReader

        reader = ExplicitReader.open(run, config.explicit_k, device)
        plain = {SystemName.EXPLICIT_CONTROL: reader.control} if reader.control is not None else {}
        return ExplicitEvaluation(reader, plain)

    def result_rows(self, components: set[str], tuned_on: str | None) -> list[ResultRow]:
        """The explicit-memory LM, its control, and (when evaluate scored an MLP memory) the explicit-memory LM
        mixed with the MLP memory (the memory reads the base LM's keys at the same positions)."""
        if SystemName.EXPLICIT_MEMORY not in components:
            return []
        rows = [ResultRow(SystemName.EXPLICIT_MEMORY, SystemName.EXPLICIT_MEMORY)]
        if SystemName.EXPLICIT_CONTROL in components:
            rows.append(ResultRow(SystemName.EXPLICIT_CONTROL, SystemName.EXPLICIT_CONTROL))
        if SystemName.MLP_MEMORY in components and tuned_on is not None:
            rows.append(
                ResultRow(SystemName.EXPLICIT_MEMORY_MLP_MEMORY, SystemName.EXPLICIT_MEMORY, SystemName.MLP_MEMORY)
            )
        return rows

    # scoring models, generate, export
    def scoring_models(self, run, evaluated, device) -> dict[SystemName, Any]:
        """The explicit-memory LM reading the memories its input retrieves (``ExplicitScoringModel``) and its
        control, when ``evaluated`` scored them."""
        names = {s.name for s in evaluated.systems}
        if SystemName.EXPLICIT_MEMORY not in names:
            return {}
        from mlpmem.explicit.scoring import ExplicitReader, ExplicitScoringModel

        reader = ExplicitReader.open(run, evaluated.config.explicit_k, device)
        models = {SystemName.EXPLICIT_MEMORY: ExplicitScoringModel(reader)}
        if reader.control is not None and SystemName.EXPLICIT_CONTROL in names:
            models[SystemName.EXPLICIT_CONTROL] = reader.control
        return models

    def joint_component(self, run, lm, model_fp, options) -> dict[str, Any] | None:
        return None  # its LM is not the joint model's base LM

    def generates(self, config) -> bool:
        return bool(config.explicit)

    def generate(self, config, prompts: list[str], kwargs: dict[str, Any]) -> tuple[list[str], str]:
        from mlpmem.explicit.generation import generate_explicit

        return generate_explicit(config, prompts, kwargs)

    # mlpmem bench
    def bench(self, run, prompt, config, device) -> dict[str, Any] | None:
        if run.complete(STAGE) is None:
            return None
        from mlpmem.explicit.bench import measure_explicit

        return measure_explicit(run, prompt, config, device)

    def bench_lines(self, section: dict[str, Any]) -> list[str]:
        from mlpmem.explicit.bench import explicit_lines

        return explicit_lines(section)


EXPLICIT = ExplicitSystem()
