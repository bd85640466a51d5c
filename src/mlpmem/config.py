"""Typed, validated configs for every stage; YAML in and out; CLI flags derived from the same fields.

Each stage has one pydantic model. Field names are the YAML keys and the CLI flags (``--max-steps`` or
``--max_steps``); descriptions are the ``--help`` text. Validation problems are all reported at once, each
naming its flag, as one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlpmem.errors import UsageError

Device = str  # "auto", "cpu", "cuda", "cuda:1", "mps"
DType = Literal["auto", "float32", "bfloat16", "float16"]
Weight = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # a mixing weight λ
Temperature = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # T of softmax(-d/T)
MemoryDType = Literal["fp32", "bf16", "int8"]
MEMORY_DTYPE_HELP = "the memory's weights: fp32, bf16, or int8 (weight-only, one scale per output channel)"


Attribute = Literal["birth_date", "birth_city", "university", "field", "employer", "employer_city"]
ATTRIBUTES: tuple[str, ...] = Attribute.__args__  # type: ignore[attr-defined]


class FactsConfig(BaseModel):
    """The settings of ``--corpus facts`` (``--facts.FIELD``): what the generator writes, all from ``seed``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_people: int = Field(200, ge=1, description="seen people: in train (and held-out biographies in valid/test)")
    n_memory_only: int = Field(
        100, ge=0, description="memory-only people: only in the memory split (datastore, memory keys, references)"
    )
    n_unseen: int = Field(100, ge=0, description="unseen people: in no text, only probed (hallucination)")
    biographies_per_person: int = Field(4, ge=1, description="biographies of each seen or memory-only person")
    held_out_biographies: int = Field(1, ge=1, description="other biographies of each seen person in valid and in test")
    values_per_attribute: int = Field(
        32, ge=2, le=10_000, description="distinct values of each attribute (the candidates of its probes)"
    )
    attributes: list[Attribute] = Field(
        list(ATTRIBUTES), min_length=1, description="attributes each person has and each biography states"
    )
    seed: int = Field(0, description="seed of names, values, templates and order")

    @field_validator("attributes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists an attribute twice")
        return v


def nameable(path: Path) -> Path:
    """A path the file system can name: no folder or file name longer than NAME_MAX bytes (255 on Linux) and the
    whole within PATH_MAX, checked before any work (else the OS refuses it mid-command)."""
    try:
        name_max, path_max = os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > name_max:
        raise ValueError(f"a name in it is {longest} bytes long; the file system allows {name_max}")
    if len(os.fsencode(path)) >= path_max:
        raise ValueError(f"it is {len(os.fsencode(path))} bytes long; the file system allows {path_max - 1}")
    return path


FsPath = Annotated[Path, AfterValidator(nameable)]  # a path checked by ``nameable``


def setting(default: Any, description: str, **kwargs: Any) -> Any:
    """A field that changes how a stage runs, not what it builds (device, inference batch size, threads...).

    Settings are left out of a stage's identity: changing one never invalidates a complete stage.
    """
    extra = {"identity": False, **kwargs.pop("json_schema_extra", {})}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def replace_setting() -> Any:
    """``replace`` of the stages that refuse to replace a finished version later stages were built from
    (``RunDir.refuse_replacing``)."""
    return setting(
        False,
        "rebuild this stage although later stages were built from the finished one (they are rebuilt when rerun); "
        "default: refused",
    )


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, assignments are validated, no inf/nan numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    run_dir: FsPath = setting(Path("runs/default"), "run directory; one sub-folder per stage", exclude=True)
    threads: int | None = setting(
        None,
        "CPU threads for torch and FAISS; default: the cores this process may use (recorded in the manifest)",
        ge=1,
    )

    @classmethod
    def identity_fields(cls) -> set[str]:
        """The fields that define what the stage builds (everything not declared with ``setting``)."""
        return {
            name
            for name, field in cls.model_fields.items()
            if not (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("identity") is False)
        }

    def identity(self) -> dict[str, Any]:
        """This config's identity: the JSON of its identity fields."""
        return self.model_dump(mode="json", include=self.identity_fields())

    @classmethod
    def identity_of(cls, config: StageConfig | dict[str, Any] | None) -> dict[str, Any] | None:
        """The identity of a config recorded in a manifest (None stays None)."""
        if config is None:
            return None
        data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
        # a field added after the stage was built counts as its default (which keeps the old behaviour)
        defaults = cls.model_construct().model_dump(mode="json", include=cls.identity_fields())
        return {k: data.get(k, defaults.get(k)) for k in cls.identity_fields() if k in data or k in defaults}


class PrepareConfig(StageConfig):
    corpus: str = Field(
        "wikitext-2-slice",
        description="corpus: 'wikitext-2-slice' (bundled), 'wikitext-2' (full, from shared/data), 'facts' "
        "(synthetic biographies and their probes, settings --facts.*), a UTF-8 text file or directory of them, or "
        "'hf:NAME[:CONFIG]' (Hugging Face datasets)",
    )
    facts: FactsConfig | None = Field(None, description="settings of --corpus facts (default: its defaults)")
    tokenizer: str | None = Field(None, description="tokenizer of the base model (HF id or path)")
    train_tokenizer: int | None = Field(
        None, ge=260, description="train a byte-level BPE with this vocabulary size instead"
    )
    include: list[str] | None = Field(
        None,
        description="glob(s) selecting the files of a corpus directory, matched against the relative path or "
        "the name (e.g. '*.py'); default: every file (binary and non-UTF-8 files are skipped with a warning)",
    )
    valid_fraction: float = Field(0.05, gt=0, lt=0.5, description="share carved for valid when the source has no split")
    test_fraction: float = Field(0.05, gt=0, lt=0.5, description="share carved for test when the source has no split")
    text_column: str = Field("text", description="column holding the text in a Hugging Face dataset")
    replace: bool = replace_setting()

    @model_validator(mode="before")
    @classmethod
    def _facts_settings(cls, data: Any) -> Any:
        """--corpus facts takes its settings' defaults; another corpus takes none."""
        if isinstance(data, dict) and data.get("corpus") == "facts" and data.get("facts") is None:
            return {**data, "facts": {}}
        if isinstance(data, dict) and data.get("facts") is not None and data.get("corpus") != "facts":
            raise ValueError("--facts.* settings are for --corpus facts only")
        return data

    @model_validator(mode="after")
    def _one_tokenizer(self) -> PrepareConfig:
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("give exactly one of --tokenizer NAME_OR_PATH or --train-tokenizer VOCAB_SIZE")
        return self


class LMTrainingConfig(StageConfig):
    """The optimizer and precision fields of the stages that train an LM (train-lm, train-explicit)."""

    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a share of the peak (linear decay)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm")
    seed: int = Field(0, description="random seed")
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: DType = Field(
        "auto", description="autocast dtype: auto = bfloat16 on GPU and on CPUs with native bf16, else float32"
    )


class TrainLMConfig(LMTrainingConfig):
    model: str | None = Field(
        None, description="HF id or path of a causal LM to continue training; none: a new model of --arch"
    )
    arch: Literal["gpt2", "mom", "gated-deltanet"] = Field(
        "gpt2",
        description="architecture of a from-scratch LM: gpt2 (transformer), mom (Mixture-of-Memories), "
        "gated-deltanet (MoM with one memory and no router)",
    )
    n_layer: int = Field(4, ge=1, description="layers of a from-scratch LM")
    n_head: int = Field(4, ge=1, description="attention heads (MoM: heads of each memory) of a from-scratch LM")
    n_embd: int = Field(256, ge=8, description="width of a from-scratch LM")
    head_dim: int | None = Field(
        None, ge=1, description="key and value width per head (arch mom, gated-deltanet); default n_embd // n_head"
    )
    ffn_size: int | None = Field(
        None,
        ge=1,
        description="inner width of the feed-forward layers; default 4 * n_embd (gpt2) or about 8/3 * n_embd "
        "(mom, gated-deltanet: SwiGLU)",
    )
    n_memories: int = Field(4, ge=1, description="routed memories per MoM layer (arch mom)")
    top_k: int = Field(2, ge=1, description="memories each token is routed to (arch mom; at most n_memories)")
    shared_memory: bool = Field(True, description="a memory every token also uses, besides the routed ones (arch mom)")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of MoM's load-balancing loss in the training loss")
    context: int = Field(256, ge=8, description="training window in tokens (positions of a from-scratch GPT-2)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout of a from-scratch GPT-2 (MoM has none)")
    batch_size: int = Field(16, ge=1, description="windows per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    eval_interval: int = Field(200, ge=1, description="steps between validation runs and checkpoints")
    eval_batches: int = Field(20, ge=1, description="validation micro-batches per validation run")
    replace: bool = replace_setting()


class EvaluateConfig(StageConfig):
    model: str | None = Field(None, description="HF id or path of the LM; default: the run's trained LM")
    corpus: str | None = Field(None, description="corpus to evaluate on instead of the run's prepared splits")
    splits: list[Literal["valid", "test"]] = Field(["valid", "test"], description="splits to score")
    tune_on: Literal["valid", "test"] = Field(
        "valid", description="split λ and T are tuned on; 'test' only when asked (its numbers are then not held out)"
    )
    allow_overlap: bool = setting(
        False,
        "score kNN-LM and the memory on the split their datastore was built from (marked in the table); "
        "default: refused",
    )
    context: int | None = Field(None, ge=2, description="window length in tokens; default: the model's positions")
    stride: int | None = Field(None, ge=1, description="new tokens scored per window; default: context // 2")
    batch_size: int = setting(8, "windows per forward pass", ge=1)
    max_tokens: int | None = Field(None, ge=2, description="score only the first N tokens of each split")
    knn: bool = Field(True, description="also evaluate kNN-LM when the run has a datastore and index")
    memory: bool = Field(True, description="also evaluate the MLP memory when the run has one")
    explicit: bool = Field(
        True, description="also evaluate the explicit-memory LM and its control when the run has them (train-explicit)"
    )
    explicit_k: int = Field(5, ge=1, description="references each chunk retrieves for the explicit-memory LM")
    k: int = Field(256, ge=1, description="neighbours retrieved per token for kNN-LM")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched; default: the index's own")
    rerank: bool = Field(False, description="re-rank IVF-PQ neighbours with exact distances from stored keys")
    memory_dtype: MemoryDType = Field("fp32", description=MEMORY_DTYPE_HELP)
    knn_temperatures: list[Temperature] = Field(
        [1.0, 2.0, 5.0, 10.0, 20.0, 50.0], min_length=1, description="T grid tuned on valid (an edge T is flagged)"
    )
    lmbdas: list[Weight] = Field(
        [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        min_length=1,
        description="λ grid tuned on valid, extended beyond an edge optimum up to 0 or 1",
    )
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class RecallConfig(StageConfig):
    """``mlpmem recall``: every candidate value of every knowledge probe of a facts run, scored by every row of
    the run's evaluate stage (at the λ and T evaluate tuned)."""

    max_people: int | None = Field(
        None, ge=1, description="probe only the first N people of each set (seen, memory-only, unseen); default: all"
    )
    batch_size: int = setting(256, "prompt + candidate rows per forward pass", ge=1)
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class DatastoreConfig(StageConfig):
    split: Literal["train", "valid", "test", "memory"] = Field(
        "train", description="split whose keys are stored (memory: train + the memory-only text of --corpus facts)"
    )
    context: int | None = Field(None, ge=2, description="window length; default: the LM's positions")
    stride: int | None = Field(None, ge=1, description="new keys per window; default: context // 2")
    batch_size: int = setting(8, "windows per forward pass", ge=1)
    key_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of stored keys")
    keys: Literal["stored", "streamed"] = Field(
        "stored",
        description="stored: keys [N, d] on disk; streamed (disk-light): only values are stored, `mlpmem index` "
        "recomputes the keys with the LM and streams them into its IVF-PQ index, targets and the memory "
        "(--mode online) recompute them too",
    )
    key_layer: str | None = Field(None, description="module path whose output is the key; default: found per family")
    chunk_windows: int = Field(256, ge=1, description="windows per resumable chunk")
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class StreamedKeysConfig(StageConfig):
    """The settings of the stages that recompute a streamed datastore's keys with the LM (index, targets)."""

    batch_size: int = setting(8, "windows per LM forward (a streamed datastore's keys)", ge=1)
    device: Device = setting("auto", "LM device for a streamed datastore's keys: auto, cpu, cuda, cuda:N or mps")


class IndexConfig(StreamedKeysConfig):
    factory: str | None = Field(None, description="FAISS factory string (e.g. 'IVF1024,PQ32'); default: from size")
    flat_threshold: int = Field(200_000, ge=1, description="below this many keys the index is exact (Flat)")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched by default; stored with the index")
    train_size: int = Field(262_144, ge=1, description="keys sampled to train the quantizers")
    add_chunk: int = Field(262_144, ge=1, description="keys added per chunk")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="use faiss GPU when installed")
    seed: int = Field(0, description="sampling seed")
    on_disk: bool = Field(
        False,
        description="inverted lists in a file mapped at search time (IVF only): RAM does not grow with the store; "
        "built in resumable shards of --add-chunk keys",
    )


class TargetsConfig(StreamedKeysConfig):
    k: int = Field(64, ge=1, description="neighbours per entry (self excluded)")
    knn_temperature: float = Field(10.0, gt=0, description="T in softmax(-d/T) over squared L2 distances")
    width: int = Field(128, ge=1, description="max distinct tokens kept per entry (m)")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched; default: the index's own")
    chunk_size: int = Field(16_384, ge=1, description="queries per resumable chunk")
    store: bool = Field(
        True,
        description="write every entry's targets; false (disk-light): write nothing, train-memory searches the "
        "targets of each batch in the index (from the batch's keys, at the datastore's key layer)",
    )


class TrainMemoryConfig(StageConfig):
    mode: Literal["offline", "online"] = Field(
        "offline", description="keys from the datastore, or recomputed by the LM"
    )
    key_layer: str | None = Field(
        None, description="LM module whose output is the memory's key (online mode); default: the datastore's key layer"
    )
    key_depth: float | None = Field(
        None,
        gt=0,
        le=1,
        description="or: the feed-forward input of the block at this share of the LM's depth (online mode; "
        "the paper's later version finds ~0.7 best)",
    )
    n_blocks: int = Field(4, ge=1, description="residual FFN blocks")
    hidden_size: int | None = Field(None, ge=8, description="memory width; default: the key width")
    ffn: Literal["gelu", "swiglu"] = Field("gelu", description="block type: GELU 4x (GPT-2 style) or SwiGLU")
    init_head_from_lm: bool = Field(True, description="initialise the vocab head from the LM's output embedding")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha*KL(p_kNN||p_mem) + (1-alpha)*CE(gold)")
    batch_size: int = Field(1024, ge=1, description="keys per step")
    shuffle_keys: int = Field(
        65_536,
        ge=0,
        description="online mode: keys recomputed together and shuffled across their batches, so that a batch "
        "mixes many windows (held in memory: shuffle_keys x key width x 4 bytes); up to batch_size: a batch is "
        "a few whole windows",
    )
    epochs: float = Field(2.0, gt=0, description="passes over the datastore")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a share of the peak")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm")
    eval_interval: int = Field(500, ge=1, description="steps between validation runs and checkpoints")
    valid_size: int = Field(8192, ge=0, description="held-out datastore entries for validation loss")
    lmbda: float = Field(0.25, ge=0, le=1, description="default mixing weight saved with the memory")
    seed: int = Field(0, description="random seed")
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: DType = Field(
        "auto", description="autocast dtype: auto = bfloat16 on GPU and on CPUs with native bf16, else float32"
    )

    @model_validator(mode="after")
    def _one_key_choice(self) -> TrainMemoryConfig:
        if self.key_layer is not None and self.key_depth is not None:
            raise ValueError("give --key-layer or --key-depth, not both")
        return self


class GenerateConfig(StageConfig):
    prompt: str | list[str] | None = Field(None, description="text to continue (a YAML list: one batch, left-padded)")
    max_new_tokens: int = Field(50, ge=1, description="tokens generated per prompt")
    do_sample: bool = Field(False, description="sample instead of greedy / beam search")
    temperature: float = Field(1.0, gt=0, description="sampling temperature, applied to the mixed distribution")
    top_k: int | None = Field(None, ge=1, description="sample among the k most probable tokens")
    top_p: float | None = Field(
        None, gt=0, le=1, description="sample from the smallest set holding this much probability"
    )
    num_beams: int = Field(1, ge=1, description="beam search width (1: no beam search)")
    num_return_sequences: int = Field(1, ge=1, description="continuations per prompt (<= num_beams without sampling)")
    repetition_penalty: float | None = Field(None, gt=0, description="HF repetition penalty (1: none)")
    memory: bool = Field(True, description="mix in the run's MLP memory")
    knn: bool = Field(False, description="mix in the run's kNN-LM (live search of its datastore)")
    explicit: bool = Field(
        False,
        description="generate with the run's explicit-memory LM (train-explicit) reading the references the prompt's "
        "last tokens retrieve, instead of the LM + MLP memory",
    )
    explicit_k: int = Field(5, ge=1, description="references retrieved for the explicit-memory LM")
    lmbda: float | None = Field(
        None, ge=0, le=1, description="memory weight; default: the λ evaluate tuned, else the one saved with the memory"
    )
    knn_lmbda: float | None = Field(
        None, ge=0, le=1, description="kNN-LM weight; default: tuned by evaluate, else 0.25"
    )
    knn_temperature: float | None = Field(
        None, gt=0, description="T of p_kNN; default: tuned by evaluate, else the targets' T"
    )
    k: int = Field(256, ge=1, description="neighbours retrieved per token for kNN-LM")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched; default: the index's own")
    seed: int = Field(0, description="random seed (sampling)")
    memory_dtype: MemoryDType = Field("fp32", description=MEMORY_DTYPE_HELP)
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class ExportConfig(StageConfig):
    out_dir: FsPath = Field(
        ...,
        description="folder to write the joint model into (replaced when it holds an earlier export)",
        json_schema_extra={"cli_aliases": ["--out"]},
    )
    lmbda: Weight | None = Field(
        None, description="memory weight; default: the λ evaluate tuned, else the one saved with the memory"
    )
    knn: bool = Field(False, description="also mix in the run's kNN-LM (the folder names the run; nothing copied)")
    knn_lmbda: Weight | None = Field(None, description="kNN-LM weight; default: tuned by evaluate, else 0.25")
    knn_temperature: Temperature | None = Field(None, description="T of p_kNN; default: tuned by evaluate")
    k: int = Field(256, ge=1, description="neighbours retrieved per token for kNN-LM")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched; default: the index's own")
    license: str = Field(
        "other", description="licence of the exported weights for the model card (HF identifier, e.g. apache-2.0)"
    )
    memory_dtype: MemoryDType = Field("fp32", description=MEMORY_DTYPE_HELP + ", stored as such in the folder")


class LmEvalConfig(StageConfig):
    model: str = Field(..., description="folder written by `mlpmem export` (the base LM is the one inside it)")
    tasks: list[str] = Field(..., min_length=1, description="lm-evaluation-harness task names (or groups)")
    include_path: FsPath | None = Field(
        None,
        description="folder of extra lm-eval task YAMLs (local tasks); trusted like code: a task's !function runs "
        "Python from that folder",
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; default: each task's own")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N documents of each task")
    batch_size: int = setting(8, "sequences per forward pass", ge=1)
    out_path: FsPath | None = Field(None, description="write both systems' lm-eval results here (JSON)")
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class BenchConfig(StageConfig):
    out_dir: FsPath | None = Field(
        None,
        description="where bench.json and bench.png go; default: RUN_DIR/bench",
        json_schema_extra={"cli_aliases": ["--out"]},
    )
    quick: bool = Field(
        False, description="small sizes and few tokens (fields you set yourself are kept): minutes on 2 CPU cores"
    )
    datastore_sizes: list[Annotated[int, Field(ge=1_000)]] = Field(
        [10_000, 100_000, 1_000_000, 10_000_000, 50_000_000],
        min_length=1,
        description="synthetic datastore sizes (entries, >= 1000) kNN-LM is timed at; "
        "the run's own datastore is added when it has one",
    )
    k: int = Field(1024, ge=1, description="neighbours retrieved per token for kNN-LM")
    nprobe: int = Field(32, ge=1, description="IVF lists searched")
    knn_temperature: float = Field(10.0, gt=0, description="T of p_kNN (timing only)")
    lmbda: float = Field(0.25, gt=0, lt=1, description="mixing weight (timing only)")
    prompt_tokens: int = Field(32, ge=1, description="prompt length before the timed decode steps")
    new_tokens: int = Field(64, ge=2, description="decode steps timed per repeat (batch 1, KV cache)")
    repeats: int = Field(5, ge=1, description="timed repeats after one warm-up; medians are reported")
    score_batch: int = Field(8, ge=1, description="windows per forward when timing batched scoring")
    score_context: int = Field(
        128, ge=2, description="window length when timing batched scoring (capped at the LM's positions)"
    )
    memory_blocks: int = Field(
        4, ge=1, description="blocks of a random-init memory, used when the run has no trained one"
    )
    optimisations: list[Literal["bf16", "int8", "compile"]] = Field(
        ["bf16", "int8", "compile"], description="memory speed-ups to time against the eager float32 memory"
    )
    memory_dtype: MemoryDType = Field(
        "fp32", description=MEMORY_DTYPE_HELP + "; the memory of the mlp-memory, kNN-LM ratio and long-context rows"
    )
    long_context: int = Field(
        1024, ge=16, description="KV-cache length of the base + memory vs equal-parameter decoder comparison"
    )
    fidelity_tokens: int = Field(4096, ge=16, description="valid tokens whose keys measure each variant's KL to fp32")
    keep_indexes: bool = Field(
        False,
        description="keep the synthetic indexes under OUT_DIR/work, and reuse those an earlier bench kept there "
        "(else built each time and deleted after timing)",
    )
    seed: int = Field(0, description="seed of the synthetic keys, values and inputs")
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


def describe_errors(err: ValidationError, prefix: str = "") -> str:
    """All problems of a ValidationError on one line, each naming its flag / YAML key."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see --help)"
        parts.append(f"--{prefix}{loc.replace('_', '-')}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate(cls: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from ``data`` or raise UsageError listing every problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"invalid config: {describe_errors(err, prefix)}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file, or UsageError."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text (a binary file?)") from None
    except PermissionError:
        raise UsageError(f"config file {path} cannot be read: permission denied") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values")
    return data


def to_yaml(config: BaseModel) -> str:
    """YAML text that ``validate`` turns back into an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class ReferencesConfig(StageConfig):
    split: Literal["train", "valid", "test", "memory"] = Field(
        "train",
        description="prepared split cut into references (memory: train + the memory-only text of --corpus facts)",
    )
    corpus: str | None = Field(
        None,
        description="a corpus (any source `prepare` accepts) whose train split, tokenized with the run's tokenizer, "
        "is cut instead of a prepared split",
    )
    chunk_tokens: int = Field(128, ge=8, description="tokens per reference (the last one of a corpus may be shorter)")
    retriever: Literal["bm25", "dense"] = Field(
        "bm25", description="bm25 (lexical, token ids as terms) or dense (FAISS over the LM's mean-pooled states)"
    )
    query_tokens: int = Field(64, ge=1, description="tokens before the predicted ones that form a query")
    recall_samples: int = Field(1000, ge=0, description="chunks of the split sampled to measure recall@5")
    chunk_refs: int = Field(4096, ge=1, description="references per resumable chunk (dense embeddings)")
    batch_size: int = setting(16, "references per forward pass (dense)", ge=1)
    seed: int = Field(0, description="seed of the recall sample")
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class ExplicitMemoriesConfig(StageConfig):
    keep_tokens: int = Field(8, ge=1, description="tokens kept per reference, memory layer and head")
    memory_layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="blocks that read memories (indices); default: the first half"
    )
    marker: str = Field("Reference:", description="text put (after the end-of-text token) before each reference")
    chunk_refs: int = Field(1024, ge=1, description="references per resumable chunk")
    batch_size: int = setting(32, "references per forward pass", ge=1)
    device: Device = setting("auto", "auto, cpu, cuda, cuda:N or mps")


class TrainExplicitConfig(LMTrainingConfig):
    context: int | None = Field(None, ge=8, description="training window in tokens; default: the LM's training context")
    chunk_tokens: int = Field(64, ge=1, description="tokens per chunk; each chunk retrieves one reference")
    memory_chunks: int = Field(5, ge=1, description="a chunk reads the memories of itself and the chunks before it")
    exclude_overlap: float = Field(
        0.9, gt=0, le=1, description="references holding more than this share of a chunk's own text are excluded"
    )
    control: bool = Field(True, description="also train the control: the same steps and data without memory")
    batch_size: int = Field(8, ge=1, description="windows per optimizer step")
    max_steps: int = Field(200, ge=1, description="optimizer steps (each model)")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    eval_interval: int = Field(100, ge=1, description="steps between validation runs and checkpoints")
    eval_batches: int = Field(10, ge=1, description="validation batches per validation run")
