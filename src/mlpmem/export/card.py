"""The model card (``README.md``) of an exported folder: what the model is made of, how well it does, how it was
made, and its licence, all read from the run's typed manifests."""

from __future__ import annotations

from typing import Any

import yaml

from mlpmem import __version__
from mlpmem.artifacts import RunDir
from mlpmem.config import ExportConfig
from mlpmem.evaluate.report import format_table
from mlpmem.manifests import EvaluateManifest


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def current_evaluation(run: RunDir, model_fp: str) -> EvaluateManifest | None:
    """The run's complete evaluation when it scored this LM with the current memory (else None)."""
    evaluate, memory = run.complete("evaluate"), run.complete("train-memory")
    if evaluate is None or memory is None or evaluate.inputs.get("model") != model_fp:
        return None
    return evaluate if evaluate.inputs.get("train-memory") == memory.fingerprint else None


def front_matter(prepare: Any, lm: Any, config: ExportConfig) -> str:
    """The Hub's YAML header: licence, library, base model (when the LM continued a Hub model), dataset, tags."""
    meta: dict[str, Any] = {"license": config.license, "library_name": "transformers"}
    meta["pipeline_tag"] = "text-generation"
    if lm.config.model:
        meta["base_model"] = lm.config.model
    if prepare.config.corpus.startswith("hf:"):
        meta["datasets"] = [prepare.config.corpus.removeprefix("hf:").split(":")[0]]
    meta["tags"] = ["mlpmem", "mlp-memory", "knn-lm", "memory-augmented"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


# the from-scratch architectures of ``mlpmem train-lm --arch`` as a reader knows them
ARCHITECTURE_NAMES = {"gpt2": "GPT-2", "mom": "MoM (Mixture-of-Memories)", "gated-deltanet": "Gated DeltaNet"}


def base_model_line(lm: Any) -> str:
    """What the base LM is, from its train-lm manifest: the hub model continued (with its revision) or the
    architecture trained from scratch."""
    if lm.config.model:
        revision = f" at revision `{lm.base_revision}`" if lm.base_revision else ""
        return f"`{lm.config.model}`{revision} continued for {_n(lm.steps)} steps"
    sizes = f"{lm.config.n_layer} layers, width {lm.config.n_embd}, {_n(lm.steps)} steps"
    return f"{ARCHITECTURE_NAMES[lm.config.arch]} trained from scratch ({sizes})"


def model_card(run: RunDir, model: Any, config: ExportConfig, lmbda_source: str, command: str) -> str:
    """README.md for the exported ``model`` (a ``MemoryAugmentedForCausalLM``) of ``run``."""
    prepare, lm, memory = run.require("prepare"), run.require("train-lm"), run.require("train-memory")
    mcfg = model.memory.config
    tokens = ", ".join(f"{split} {prepare.split_tokens(split):,}" for split in prepare.arrays)
    base = base_model_line(lm)
    rows = [
        ("base LM", f"{base}; {_n(lm.parameters)} parameters; fingerprint `{lm.model_fingerprint}`"),
        ("corpus", f"{prepare.source} (`--corpus {prepare.config.corpus}`); {tokens} tokens"),
        ("corpus fingerprint", f"`{prepare.corpus_fingerprint}`"),
        ("tokenizer", f"vocabulary {_n(prepare.vocab_size)}; fingerprint `{prepare.tokenizer_fingerprint}`"),
        (
            "MLP memory",
            f"{mcfg.n_blocks} blocks of width {mcfg.hidden_size} ({mcfg.ffn}); {_n(memory.parameters)} parameters, "
            f"{_n(memory.summary()['memory_bytes'])} bytes; keys from `{model.memory_layer}`",
        ),
        (
            "memory training",
            f"{memory.config.mode}, α = {mcfg.alpha:g} (KL to p_kNN, T = {mcfg.knn_temperature}) + "
            f"{1 - mcfg.alpha:g} CE; {_n(memory.train_entries)} datastore entries, {_n(memory.steps)} steps",
        ),
        ("λ (memory weight)", f"{model.lmbda:g}: {lmbda_source}"),
    ]
    if model.knn is not None:
        knn = model.config.knn
        rows.append(
            (
                "kNN-LM",
                f"λ = {knn['knn_lmbda']:g}, T = {knn['knn_temperature']:g}, k = {knn['k']}, datastore and index "
                f"read from `{knn['run_dir']}` (not in this folder)",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    evaluation = current_evaluation(run, lm.model_fingerprint)
    results = (
        f"Sliding-window perplexity (context {evaluation.context}, stride {evaluation.stride}; "
        + ", ".join(f"{s} {n:,}" for s, n in evaluation.tokens.items())
        + f" tokens; λ and T tuned on {evaluation.tuned_on}), from `mlpmem evaluate`:\n\n```\n"
        + format_table(evaluation.systems)
        + "\n```\n"
        if evaluation is not None
        else "Not evaluated: run `mlpmem evaluate` on the run, then export again.\n"
    )
    return f"""{front_matter(prepare, lm, config)}
# Base LM + retriever-pretrained MLP memory

A causal LM whose next-token distribution is mixed with an MLP memory trained to imitate a kNN retriever over
the corpus ([MLP Memory, arXiv 2508.01832](https://arxiv.org/abs/2508.01832)):
p = (1 − λ)·p_LM + λ·p_mem, computed in log space. Made with mlpmem {__version__}.

| part | |
| --- | --- |
{table}

## Results

{results}
## Use

```python
import mlpmem  # registers the model classes with transformers' Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")   # logits = mixed next-token log-probs
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
print(pipeline("text-generation", model=model, tokenizer=tokenizer)("The history of", max_new_tokens=20))
```

`model.lm` is the base LM alone; `model.memory` the MLP memory (`MLPMemory`).

## How it was made

```
{command}
```

## Licence

The weights: `{config.license}`. The corpus keeps its own licence ({prepare.source}); mlpmem's code is Apache-2.0.
"""
