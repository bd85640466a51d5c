"""A tiny run for the explicit-memory stages: prepare (a noisy repeating token pattern) and train-lm (a random
2-layer GPT-2 saved with a word-level tokenizer), made through the real stage API."""

from __future__ import annotations

from pathlib import Path

from mlpmem.artifacts import RunDir
from mlpmem.config import ExplicitMemoriesConfig, ReferencesConfig, TrainLMConfig
from mlpmem.explicit.memories import build_explicit_memories
from mlpmem.explicit.references import build_references
from mlpmem.lm.load import model_fingerprint

from conftest import make_tiny_run, tiny_gpt2
from gen_inputs import tiny_tokenizer


def explicit_run(run_dir: Path, n_train: int = 1200, n_eval: int = 300, n_memory: int = 0) -> Path:
    make_tiny_run(run_dir, n_train=n_train, n_eval=n_eval, n_memory=n_memory)
    run = RunDir(run_dir)
    build = run.begin(
        "train-lm",
        TrainLMConfig(n_layer=2, n_head=2, n_embd=32, context=64, max_steps=1),
        {"prepare": run.require("prepare").fingerprint},
    )
    tiny_gpt2(seed=0).save_pretrained(build.dir / "model")
    tiny_tokenizer().save_pretrained(build.dir / "model")
    build.complete(model_fingerprint=model_fingerprint(build.dir / "model"))
    return run_dir


CONFIG = dict(  # train-explicit on the tiny run: 16-token chunks, 3 memory chunks
    chunk_tokens=16,
    memory_chunks=3,
    batch_size=2,
    max_steps=4,
    eval_interval=2,
    eval_batches=1,
    warmup_steps=1,
    device="cpu",
    dtype="float32",
)


def memory_run(path, split: str = "train", n_memory: int = 0):
    """The tiny run with references cut from ``split`` (``memory``: the train tokens and ``n_memory`` more)."""
    explicit_run(path, n_memory=n_memory)
    build_references(ReferencesConfig(run_dir=path, split=split, chunk_tokens=32, query_tokens=16, recall_samples=0))
    build_explicit_memories(ExplicitMemoriesConfig(run_dir=path, keep_tokens=4, device="cpu"))
    return path
