"""THE table of stages. The CLI, ``mlpmem run``, ``RunConfig``, the end-of-run summary and every "run X first"
hint derive from it; adding a stage (or a memory system) is one row here plus its package.

A row's name is its CLI command and, for stages that build an artifact, its run-directory folder. Entry
functions are named "module:function" and imported only when the command runs (``mlpmem --help`` stays fast).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from mlpmem.artifacts import Manifest
from mlpmem.config import (
    BenchConfig,
    DatastoreConfig,
    EvaluateConfig,
    ExplicitMemoriesConfig,
    ExportConfig,
    FsPath,
    GenerateConfig,
    IndexConfig,
    LmEvalConfig,
    PrepareConfig,
    RecallConfig,
    ReferencesConfig,
    StageConfig,
    TargetsConfig,
    TrainExplicitConfig,
    TrainLMConfig,
    TrainMemoryConfig,
    validate,
)
from mlpmem.errors import UsageError
from mlpmem.manifests import (
    DatastoreManifest,
    EvaluateManifest,
    ExplicitMemoriesManifest,
    IndexManifest,
    PrepareManifest,
    RecallManifest,
    ReferencesManifest,
    TargetsManifest,
    TrainExplicitManifest,
    TrainLMManifest,
    TrainMemoryManifest,
)


@dataclass(frozen=True)
class StageSpec:
    """One command. ``manifest`` is None for actions that build no stage folder (generate, bench)."""

    name: str
    config: type[StageConfig]
    manifest: type[Manifest] | None
    entry: str  # "module:function" taking the config and returning the manifest (or the action's result)
    upstream: tuple[str, ...]  # stages whose complete manifests it reads
    help: str
    report: str | None = None  # "module:function" printing the result on the terminal (the CLI calls it)
    locks: bool | None = None  # takes the run's lock; None: when it builds a stage
    multi_process: bool = False  # shares its work between the processes of a launch (accelerate launch, torchrun)
    by_default: bool = True  # in a pipeline that lists no stages (False: it needs an input only some runs have)

    @property
    def section(self) -> str:
        """Its key in a pipeline YAML (``train-lm`` -> ``train_lm``)."""
        return self.name.replace("-", "_")

    @property
    def builds(self) -> bool:
        return self.manifest is not None

    @property
    def takes_lock(self) -> bool:
        return self.builds if self.locks is None else self.locks

    def function(self):
        module, name = self.entry.split(":")
        return getattr(importlib.import_module(module), name)

    def reporter(self):
        if self.report is None:
            return None
        module, name = self.report.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "prepare",
        PrepareConfig,
        PrepareManifest,
        "mlpmem.data.prepare:prepare",
        (),
        "tokenize a corpus into train/valid/test token stores",
    ),
    StageSpec(
        "train-lm",
        TrainLMConfig,
        TrainLMManifest,
        "mlpmem.lm.train:train_lm",
        ("prepare",),
        "train the base LM (GPT-2 from scratch, or continue an HF model)",
        multi_process=True,
    ),
    StageSpec(
        "datastore",
        DatastoreConfig,
        DatastoreManifest,
        "mlpmem.knn.datastore:build_datastore",
        ("prepare", "train-lm"),
        "store keys (an FFN input of the LM) and next tokens of a split",
        multi_process=True,
    ),
    StageSpec(
        "index",
        IndexConfig,
        IndexManifest,
        "mlpmem.knn.index:build_index",
        ("datastore",),
        "build the FAISS index over the datastore keys",
        multi_process=True,
    ),
    StageSpec(
        "targets",
        TargetsConfig,
        TargetsManifest,
        "mlpmem.knn.targets:build_targets",
        ("datastore", "index"),
        "kNN target distributions for every datastore entry",
        multi_process=True,
    ),
    StageSpec(
        "train-memory",
        TrainMemoryConfig,
        TrainMemoryManifest,
        "mlpmem.memory.train:train_memory",
        ("train-lm", "datastore", "targets"),
        "train the MLP memory to imitate the kNN targets",
        multi_process=True,
    ),
    StageSpec(
        "references",
        ReferencesConfig,
        ReferencesManifest,
        "mlpmem.explicit.references:build_references",
        ("prepare", "train-lm"),
        "cut a corpus into references and build their retriever (explicit memory)",
    ),
    StageSpec(
        "explicit-memories",
        ExplicitMemoriesConfig,
        ExplicitMemoriesManifest,
        "mlpmem.explicit.memories:build_explicit_memories",
        ("train-lm", "references"),
        "sparse attention key/values of every reference, encoded by the LM",
    ),
    StageSpec(
        "train-explicit",
        TrainExplicitConfig,
        TrainExplicitManifest,
        "mlpmem.explicit.train:train_explicit",
        ("prepare", "train-lm", "references", "explicit-memories"),
        "continue the LM reading explicit memories, and its control without them",
    ),
    StageSpec(
        "evaluate",
        EvaluateConfig,
        EvaluateManifest,
        "mlpmem.evaluate.run:evaluate",
        ("prepare", "train-lm", "datastore", "index", "train-memory", "train-explicit"),
        "perplexity of base, kNN-LM, MLP memory, both, and explicit memory with its control",
        report="mlpmem.evaluate.report:print_results",
        multi_process=True,
    ),
    StageSpec(
        "recall",
        RecallConfig,
        RecallManifest,
        "mlpmem.evaluate.recall:recall",
        ("prepare", "evaluate"),
        "knowledge recall on the facts probes: every candidate value scored by every evaluated system",
        report="mlpmem.evaluate.recall:print_recall",
        by_default=False,
    ),
    StageSpec(
        "generate",
        GenerateConfig,
        None,
        "mlpmem.inference.generation:generate_from_config",
        ("train-lm",),
        "generate text with the LM + MLP memory (and/or kNN-LM)",
        report="mlpmem.inference.generation:print_generations",
    ),
    StageSpec(
        "bench",
        BenchConfig,
        None,
        "mlpmem.bench.run:bench",
        ("train-lm",),
        "decode latency, scoring throughput and storage: base, memory, kNN-LM, equal-size decoder",
        report="mlpmem.bench.report:print_report",
        locks=True,
    ),
    StageSpec(
        "export",
        ExportConfig,
        None,
        "mlpmem.export.run:export_model",
        ("train-lm", "train-memory"),
        "write the LM + memory as one Hugging Face model folder (safetensors, tokenizer, model card)",
        report="mlpmem.export.run:print_export",
        locks=True,
    ),
    StageSpec(
        "lm-eval",
        LmEvalConfig,
        None,
        "mlpmem.evaluate.harness:lm_eval_side_by_side",
        (),
        "lm-evaluation-harness tasks on an exported model's base LM and on the LM + memory, side by side",
        report="mlpmem.evaluate.harness:print_side_by_side",
    ),
)
BY_NAME = {spec.name: spec for spec in STAGES}
BUILD_STAGES = tuple(spec.name for spec in STAGES if spec.builds)
DEFAULT_STAGES = tuple(spec.name for spec in STAGES if spec.builds and spec.by_default)


def stage_spec(name: str) -> StageSpec:
    if name not in BY_NAME:
        raise UsageError(f"unknown stage {name!r} (stages: {', '.join(BY_NAME)})")
    return BY_NAME[name]


class _RunConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def stage_config(self, stage: str) -> StageConfig:
        """The typed config of one stage, with the shared run_dir."""
        spec = stage_spec(stage)
        section = dict(getattr(self, spec.section))
        section["run_dir"] = self.run_dir
        return validate(spec.config, section, prefix=spec.section + ".")

    def stage_configs(self) -> dict[str, StageConfig]:
        """Every section validated (not only the stages to run): a typo anywhere is reported before any work."""
        return {name: self.stage_config(name) for name in BUILD_STAGES}


RunConfig = create_model(
    "RunConfig",
    __base__=_RunConfigBase,
    __doc__="A whole pipeline: ``run_dir``, the stages to run in order, and one section per stage.",
    run_dir=(FsPath, Field(Path("runs/default"), description="run directory shared by every stage")),
    stages=(list[Literal[BUILD_STAGES]], Field(list(DEFAULT_STAGES), min_length=1)),  # type: ignore[valid-type]
    **{BY_NAME[name].section: (dict[str, Any], Field(default_factory=dict)) for name in BUILD_STAGES},
)
