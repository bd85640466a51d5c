"""Tiny memory-stage inputs (import the fixtures into a test module): a run with a datastore (keys from a local
hook, float32 LM) and sparse targets.

The datastore is written here, independently of mlpmem.knn and mlpmem.memory: one window per forward, keys
taken by a plain forward hook on the last block's ``ln_2``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mlpmem.artifacts import RunDir
from mlpmem.config import DatastoreConfig, TargetsConfig
from mlpmem.data.windows import sliding_windows

from conftest import TINY_VOCAB, make_tiny_run

KEY_LAYER = "transformer.h.1.ln_2"
CONTEXT, STRIDE, WIDTH = 32, 16, 6


def datastore_keys(run_dir: Path, context: int = CONTEXT, stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """float32 keys [N, 32] and the split's tokens, one unpadded window per forward."""
    lm = AutoModelForCausalLM.from_pretrained(run_dir / "train-lm" / "model").eval()
    tokens = np.fromfile(run_dir / "prepare" / "train.bin", dtype=np.uint16).astype(np.int64)
    captured = {}
    handle = lm.get_submodule(KEY_LAYER).register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    keys = np.zeros((len(tokens) - 1, lm.config.n_embd), np.float32)
    with torch.no_grad():
        for w in sliding_windows(len(tokens), context, stride):
            lm(torch.from_numpy(tokens[w.begin : w.end])[None])
            keys[w.first_scored : w.end - 1] = captured["h"][0, w.first_scored - w.begin : w.end - 1 - w.begin].numpy()
    handle.remove()
    return keys, tokens


def write_inputs(run_dir: Path, seed: int = 0) -> Path:
    """Complete 'datastore' and 'targets' stages for a tiny run (targets: gold-heavy random sparse rows)."""
    rng = np.random.default_rng(seed)
    keys, tokens = datastore_keys(run_dir)
    n, d = keys.shape
    run = RunDir(run_dir)
    lm = run.require("train-lm")
    ds = run.begin(
        "datastore", DatastoreConfig(context=CONTEXT, stride=STRIDE, key_layer=KEY_LAYER), {"train-lm": lm.fingerprint}
    )
    ds.add_array("keys", "float16", (n, d))[:] = keys.astype(np.float16)
    ds.add_array("values", "int32", (n,))[:] = tokens[1:]
    windows = len(sliding_windows(len(tokens), CONTEXT, STRIDE))
    ds.complete(
        model_fingerprint=lm.model_fingerprint, key_layer=KEY_LAYER, context=CONTEXT, stride=STRIDE, windows=windows
    )
    tg = run.begin(
        "targets", TargetsConfig(knn_temperature=7.0, width=WIDTH, k=WIDTH), {"datastore": ds.manifest.fingerprint}
    )
    t_tokens = np.full((n, WIDTH), -1, np.int32)
    t_probs = np.zeros((n, WIDTH), np.float32)
    for i in range(n):
        m = int(rng.integers(1, WIDTH + 1))
        others = rng.choice(np.setdiff1d(np.arange(TINY_VOCAB), [tokens[i + 1]]), m - 1, replace=False)
        row = (
            np.concatenate([[tokens[i + 1]], others])
            if rng.random() < 0.8
            else rng.choice(TINY_VOCAB, m, replace=False)
        )
        p = rng.dirichlet(np.ones(m))
        p[0] += 1.0  # the first token carries most of the mass
        t_tokens[i, :m], t_probs[i, :m] = row, p / p.sum()
    tg.add_array("tokens", "int32", (n, WIDTH))[:] = t_tokens
    tg.add_array("probs", "float32", (n, WIDTH))[:] = t_probs
    tg.add_array("gold", "int32", (n,))[:] = tokens[1:]
    tg.complete()
    return run_dir


@pytest.fixture(scope="session")
def memory_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("memory") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_tiny_run(run, n_train=1600)
        return write_inputs(run)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def memory_run(memory_run_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a run with complete prepare, lm, datastore and targets stages."""
    return Path(shutil.copytree(memory_run_template, tmp_path / "run"))
