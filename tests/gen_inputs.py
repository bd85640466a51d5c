"""Tiny inference inputs: a run with an LM + word-level tokenizer, a random (peaked) MLP memory paired with it that
reads block 0's feed-forward input, and a datastore (block 1's, the last) + exact index over the train split.

Every stage is made through the real stage API (``RunDir.begin`` ... ``complete``) with content computed here: the
datastore's keys come from a plain forward hook, not from ``mlpmem.knn`` or the forward core.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mlpmem.artifacts import RunDir
from mlpmem.config import DatastoreConfig, EvaluateConfig, IndexConfig, TrainLMConfig, TrainMemoryConfig
from mlpmem.lm.load import model_fingerprint
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig

from conftest import TINY_VOCAB, make_tiny_run, tiny_gpt2

MEMORY_LAYER = "transformer.h.0.ln_2"  # the memory reads block 0's feed-forward input ...
KNN_LAYER = "transformer.h.1.ln_2"  # ... the datastore the last block's
WORDS = ["<eos>"] + [f"w{i}" for i in range(1, TINY_VOCAB)]


def evaluate_config(run_dir: Path) -> EvaluateConfig:
    """Evaluation of a generation run: both systems, a small T and λ grid, 32-token windows."""
    return EvaluateConfig(
        run_dir=run_dir, k=16, knn_temperatures=[2.0, 5.0], lmbdas=[0.1, 0.3, 0.6], context=32, stride=16, device="cpu"
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the tiny vocabulary ("w1 w2 ..."; id 0 is <eos>)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>")


def tiny_memory(
    model_fp: str, seed: int = 0, lmbda: float = 0.5, layer: str = MEMORY_LAYER, vocab_size: int = TINY_VOCAB
) -> MLPMemory:
    """A random 2-block memory with a peaked head (so mixing visibly changes the LM's choices)."""
    torch.manual_seed(seed)
    cfg = MLPMemoryConfig(
        input_dim=32,
        hidden_size=32,
        n_blocks=2,
        vocab_size=vocab_size,
        base_model_fingerprint=model_fp,
        key_layer=layer,
        lmbda=lmbda,
        knn_temperature=5.0,
    )
    memory = MLPMemory(cfg).eval()
    with torch.no_grad():
        memory.head.weight.mul_(40.0)
    return memory


def write_memory(run_dir: Path, memory: MLPMemory, seed: int = 0) -> None:
    """(Re)build the run's train-memory stage holding ``memory`` (``seed`` makes a distinct stage identity)."""
    run = RunDir(run_dir)
    inputs = {"train-lm": run.require("train-lm").fingerprint, "datastore": run.require("datastore").fingerprint}
    build = run.begin(
        "train-memory", TrainMemoryConfig(mode="online", key_layer=memory.config.key_layer, seed=seed), inputs
    )
    memory.save_pretrained(build.dir / "model")
    build.complete(key_layer=memory.config.key_layer)


def datastore_keys(lm: torch.nn.Module, tokens: np.ndarray, layer: str, window: int = 64) -> np.ndarray:
    """Keys [n - 1, d] of ``layer`` at positions 0 .. n - 2, from disjoint windows and a plain forward hook."""
    captured = {}
    handle = lm.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    keys = []
    with torch.no_grad():
        for a in range(0, len(tokens) - 1, window):
            lm(torch.from_numpy(tokens[a : min(a + window, len(tokens) - 1)])[None])
            keys.append(captured["h"][0].numpy())
    handle.remove()
    return np.concatenate(keys)


def write_datastore_and_index(run: RunDir, lm, prepare_fp: str, lm_manifest, split: str) -> None:
    """Complete datastore (``split``'s keys at ``KNN_LAYER``, fp16, one window per 64 tokens) and an exact index."""
    tokens = np.asarray(run.array("prepare", split), dtype=np.int64)
    keys = datastore_keys(lm, tokens, KNN_LAYER)
    build = run.begin(
        "datastore",
        DatastoreConfig(split=split, context=64, stride=64, key_layer=KNN_LAYER),
        {"prepare": prepare_fp, "train-lm": lm_manifest.fingerprint},
    )
    for name, dtype, data in (("keys", "float16", keys), ("values", "int32", tokens[1:])):
        array = build.add_array(name, dtype, data.shape)
        array[:] = data.astype(dtype)
        array.flush()
    ds = build.complete(
        model_fingerprint=lm_manifest.model_fingerprint,
        key_layer=KNN_LAYER,
        context=64,
        stride=64,
        windows=-(-len(keys) // 64),
    )

    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.astype(np.float16).astype(np.float32))
    build = run.begin("index", IndexConfig(factory="Flat"), {"datastore": ds.fingerprint})
    faiss.write_index(index, str(build.dir / "index.faiss"))
    build.complete(factory="Flat", ntotal=len(keys))


def write_generation_run(run_dir: Path, datastore_split: str = "train") -> Path:
    """Complete prepare, train-lm (with tokenizer), datastore (of ``datastore_split``), index and train-memory."""
    make_tiny_run(run_dir, n_train=800, n_eval=100)
    run = RunDir(run_dir)
    prep = run.require("prepare")
    build = run.begin(
        "train-lm",
        TrainLMConfig(n_layer=2, n_head=2, n_embd=32, context=64, max_steps=1),
        {"prepare": prep.fingerprint},
    )
    lm = tiny_gpt2(seed=0)
    lm.save_pretrained(build.dir / "model")
    tiny_tokenizer().save_pretrained(build.dir / "model")
    lm_manifest = build.complete(model_fingerprint=model_fingerprint(build.dir / "model"))

    write_datastore_and_index(run, lm, prep.fingerprint, lm_manifest, datastore_split)
    write_memory(run_dir, tiny_memory(lm_manifest.model_fingerprint))
    return run_dir


@pytest.fixture(scope="session")
def generation_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_generation_run(tmp_path_factory.mktemp("generation") / "run")
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def generation_run(generation_run_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a run with complete prepare, train-lm (+ tokenizer), datastore, index and train-memory."""
    return Path(shutil.copytree(generation_run_template, tmp_path / "run"))


@pytest.fixture(scope="session")
def exported(generation_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported with λ = 0.4 (no end-of-text token, so every generation runs its full length)."""
    import json

    from mlpmem.cli import main

    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", "--run-dir", str(generation_run_template), "--out", str(out), "--lmbda", "0.4"]) == 0
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = None
    (out / "generation_config.json").write_text(json.dumps(config))
    return out
