"""The typed manifest of every stage, one beside each config (``mlpmem.config``), in pipeline order.

A later stage reads an earlier one only through these models (``RunDir.require(stage)``). Each value lives in
one place: counts that an array's shape gives are read from the shape, settings from the config; a field here is
what the stage found or measured. Fields are None while a stage runs and set when it completes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mlpmem.artifacts import Manifest
from mlpmem.config import (
    DatastoreConfig,
    EvaluateConfig,
    ExplicitMemoriesConfig,
    IndexConfig,
    PrepareConfig,
    RecallConfig,
    ReferencesConfig,
    TargetsConfig,
    TrainExplicitConfig,
    TrainLMConfig,
    TrainMemoryConfig,
)
from mlpmem.memory_system import SystemName


class PrepareManifest(Manifest):
    """Token stores ``train``/``valid``/``test`` (arrays) and the tokenizer folder; a facts corpus adds ``memory``
    (train, then the memory-only people's biographies) and ``probes.json`` (``mlpmem.data.facts.ProbeSet``)."""

    STAGE = "prepare"
    config: PrepareConfig
    source: str | None = None
    vocab_size: int | None = None
    tokenizer_fingerprint: str | None = None
    corpus_fingerprint: str | None = None
    probes: int | None = None  # knowledge probes written (facts corpus)

    def split_tokens(self, split: str) -> int:
        return self.arrays[split].shape[0]

    def summary(self) -> dict[str, Any]:
        probes = {} if self.probes is None else {"probes": self.probes}
        return {**{f"{s}_tokens": self.split_tokens(s) for s in self.arrays}, "vocab_size": self.vocab_size, **probes}


class TrainLMManifest(Manifest):
    """The base LM in ``model/`` (save_pretrained, with the tokenizer)."""

    STAGE = "train-lm"
    config: TrainLMConfig
    model_fingerprint: str | None = None
    base_revision: str | None = None  # the commit hash of the hub model continued (--model HF id), when known
    parameters: int | None = None
    steps: int | None = None
    train_tokens: int | None = None
    train_tokens_per_s: float | None = None
    valid_loss: float | None = None
    history: list[dict[str, float]] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "parameters": self.parameters, "train_tokens": self.train_tokens}


class DatastoreManifest(Manifest):
    """``keys`` [N, d] (not when streamed) and ``values`` [N] of one split; entry i: position i predicting i + 1."""

    STAGE = "datastore"
    config: DatastoreConfig
    model_fingerprint: str | None = None
    key_layer: str | None = None
    key_width: int | None = None  # d, also when the keys are streamed (not stored)
    context: int | None = None
    stride: int | None = None
    windows: int | None = None
    processes: int | None = None  # read from manifests written before environment.processes; no longer written

    @property
    def entries(self) -> int:
        return self.arrays["values"].shape[0]

    @property
    def key_dim(self) -> int:
        return self.arrays["keys"].shape[1] if "keys" in self.arrays else self.key_width

    def summary(self) -> dict[str, Any]:
        return {"entries": self.entries, "windows": self.windows, "key_layer": self.key_layer}


class IndexManifest(Manifest):
    """``index.faiss`` over the datastore keys (squared L2)."""

    STAGE = "index"
    config: IndexConfig
    factory: str | None = None
    nlist: int | None = None
    nprobe: int | None = None
    ntotal: int | None = None
    built_on_gpu: bool | None = None
    on_disk: bool | None = None  # inverted lists in lists.bin, mapped at search time
    peak_rss_mb: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"factory": self.factory, "ntotal": self.ntotal}


class TargetsManifest(Manifest):
    """Sparse p_kNN per datastore entry: ``tokens``/``probs`` [N, width] and ``gold`` [N]."""

    STAGE = "targets"
    config: TargetsConfig
    nprobe: int | None = None
    self_found: int | None = None
    faiss_threads: int | None = None

    @property
    def stored(self) -> bool:
        """False for ``--no-store``: train-memory searches each batch's targets."""
        return "gold" in self.arrays

    @property
    def entries(self) -> int | None:
        return self.arrays["gold"].shape[0] if self.stored else None

    @property
    def width(self) -> int:
        return self.arrays["tokens"].shape[1] if self.stored else min(self.config.width, self.config.k)

    def summary(self) -> dict[str, Any]:
        if not self.stored:
            return {"entries": "searched per batch"}
        return {
            "entries": self.entries,
            "self_missing": None if self.self_found is None else self.entries - self.self_found,
        }


class TrainMemoryManifest(Manifest):
    """The MLP memory in ``model/`` (save_pretrained)."""

    STAGE = "train-memory"
    config: TrainMemoryConfig
    key_layer: str | None = None
    train_entries: int | None = None
    valid_entries: int | None = None
    steps: int | None = None
    parameters: int | None = None
    head_from_lm: bool | None = None
    keys_per_s: float | None = None
    valid: dict[str, float] | None = None
    valid_history: list[dict[str, float]] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "parameters": self.parameters,
            "key_layer": self.key_layer,
            "memory_bytes": sum(r.bytes for name, r in self.files.items() if name.endswith(".safetensors")),
        }


class SystemResult(BaseModel):
    """One row of the results table: perplexities and the mixing weights / temperature tuned for it."""

    model_config = ConfigDict(extra="forbid")
    name: SystemName
    valid_ppl: float | None = None
    test_ppl: float | None = None
    lmbda: float | None = None  # total weight of what is mixed into the LM
    weights: dict[str, float] | None = None  # per component, for combined systems
    temperature: float | None = None
    edges: list[str] = Field(default_factory=list)  # tuned values on an edge of their search: "lambda", "T"


class EvaluateManifest(Manifest):
    """Perplexity of every system on one protocol; λ and T tuned on ``tuned_on``; ``results.json``, ``lambda.png``."""

    STAGE = "evaluate"
    config: EvaluateConfig
    model: str | None = None
    context: int | None = None
    stride: int | None = None
    tokens: dict[str, int] = Field(default_factory=dict)
    tuned_on: str | None = None
    overlap: str | None = None  # an evaluated split the datastore (and the memory) were built from (--allow-overlap)
    systems: list[SystemResult] = Field(default_factory=list)
    lambda_curves: dict[str, dict[str, float]] = Field(default_factory=dict)
    memory_mass: float | None = None  # explicit memory: mean attention probability on memory tokens (memory layers)

    def system(self, name: SystemName) -> SystemResult | None:
        return next((s for s in self.systems if s.name == name), None)

    def summary(self) -> dict[str, Any]:
        return {f"{split}_tokens": n for split, n in self.tokens.items()}


class RecallCell(BaseModel):
    """One system on one set of people and one kind of template: over its probes, the candidate distribution is
    the softmax of the candidates' total log-probs."""

    model_config = ConfigDict(extra="forbid")
    probes: int
    accuracy: float  # the gold value ranked first
    gold_log_prob: float  # mean total log-prob of the gold value's tokens (nats)
    confident_wrong: float  # a wrong value ranked first with probability > 0.5 among the candidates
    ece: float  # expected calibration error of the top candidate's probability (10 equal-width bins)


class RecallRow(BaseModel):
    """One evaluate row's recall, with the weights and T it was scored at (evaluate's, tuned on its split)."""

    model_config = ConfigDict(extra="forbid")
    name: SystemName
    lmbda: float | None = None
    weights: dict[str, float] | None = None
    temperature: float | None = None
    cells: dict[str, RecallCell] = Field(default_factory=dict)  # "SET" (both templates) and "SET/TEMPLATE"


class RecallManifest(Manifest):
    """Knowledge recall of every evaluate row on the facts probes; ``results.json`` (the same table, provenance)."""

    STAGE = "recall"
    config: RecallConfig
    probes: int = 0
    chance: float | None = None  # mean of 1 / candidates over the probes: the accuracy of a uniform guess
    tuned_on: str | None = None  # the split evaluate tuned λ and T on
    systems: list[RecallRow] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"probes": self.probes, "systems": len(self.systems)}


class ReferencesManifest(Manifest):
    """References cut from a token stream: ``ids`` [n_tokens] and ``offsets`` [n_refs + 1] (reference r is
    ids[offsets[r]:offsets[r + 1]]), ``source_start`` [n_refs] (its first token's position in the split it was cut
    from); the retriever's files (``bm25/``, or ``embeddings`` [n_refs, d])."""

    STAGE = "references"
    config: ReferencesConfig
    source: str | None = None  # "split:train" or the corpus
    model_fingerprint: str | None = None  # the LM of the dense retriever's embeddings
    recall: dict[str, float] = Field(default_factory=dict)

    @property
    def references(self) -> int:
        return self.arrays["offsets"].shape[0] - 1

    def summary(self) -> dict[str, Any]:
        return {"references": self.references, "retriever": self.config.retriever, **self.recall}


class ExplicitMemoriesManifest(Manifest):
    """``memories`` [n_refs, layers, 2, heads, keep, head_dim] float16: the sparse key/values of every reference."""

    STAGE = "explicit-memories"
    config: ExplicitMemoriesConfig
    model_fingerprint: str | None = None
    memory_layers: list[int] = Field(default_factory=list)
    marker_ids: list[int] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        spec = self.arrays["memories"]
        return {"references": spec.shape[0], "bytes_per_reference": spec.nbytes // max(1, spec.shape[0])}


class TrainExplicitManifest(Manifest):
    """The explicit-memory LM in ``model/`` and its no-memory control in ``control/`` (save_pretrained, each
    continued from the warm-up LM for the same steps on the same windows); ``chunk_refs`` [n_chunks] int64: the
    reference each training chunk retrieved (-1: none)."""

    STAGE = "train-explicit"
    config: TrainExplicitConfig
    context: int | None = None
    steps: int | None = None
    parameters: int | None = None
    train_tokens: int | None = None
    chunks_with_reference: float | None = None  # share of training chunks that retrieved a reference
    history: list[dict[str, float]] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"steps": self.steps, **{k: v for k, v in last.items() if k != "step"}}
