"""Shared fixtures: tiny random-init models and tiny run directories (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mlpmem.artifacts import RunDir, fingerprint_obj
from mlpmem.config import PrepareConfig, TrainLMConfig
from mlpmem.lm.load import model_fingerprint

TINY_VOCAB = 96


def tiny_gpt2(vocab_size: int = TINY_VOCAB, n_positions: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide random-init GPT-2 in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def make_tiny_run(run_dir: Path, n_train: int = 3000, n_eval: int = 600, seed: int = 0, n_memory: int = 0) -> Path:
    """A run directory with complete 'prepare' (random token splits) and 'train-lm' (tiny GPT-2) stages, made
    through the real stage API (``RunDir.begin`` ... ``complete``) with synthetic content. ``n_memory`` > 0 adds a
    ``memory`` split (as --corpus facts writes): the train tokens, then ``n_memory`` more.

    Tokens follow a noisy repeating pattern so that neighbours carry signal.
    """
    rng = np.random.default_rng(seed)
    run = RunDir(run_dir)
    prepare = run.begin("prepare", PrepareConfig(corpus=f"synthetic-{seed}", train_tokenizer=TINY_VOCAB * 3), {})
    made = {}
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval), ("memory", n_memory)):
        base = np.tile(np.arange(TINY_VOCAB // 3), n // (TINY_VOCAB // 3) + 1)[:n]
        noise = rng.integers(0, TINY_VOCAB, n)
        made[split] = np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)
        if split == "memory":
            if not n:
                break
            made[split] = np.concatenate([made["train"], made[split]])
        arr = prepare.add_array(split, "uint16", made[split].shape)
        arr[:] = made[split]
        arr.flush()
    tok_fp = fingerprint_obj({"synthetic_tokenizer": TINY_VOCAB})
    prep = prepare.complete(source="synthetic", tokenizer_fingerprint=tok_fp, vocab_size=TINY_VOCAB)

    lm_config = TrainLMConfig(n_layer=2, n_head=2, n_embd=32, context=64, seed=seed)
    lm = run.begin("train-lm", lm_config, {"prepare": prep.fingerprint})
    tiny_gpt2(seed=seed).save_pretrained(lm.dir / "model")
    lm.complete(model_fingerprint=model_fingerprint(lm.dir / "model"))
    return run_dir


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch and FAISS thread (threads only add overhead here, and thrash on a busy machine)."""
    import faiss

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    return make_tiny_run(tmp_path / "run")


@pytest.fixture
def bit_rot(monkeypatch) -> None:
    """Damage a read does not see: every file counts as large and keeps the identity (inode, times) recorded at
    completion, as bytes that rot below the file system do, so reads trust it and only a full hash (``mlpmem
    verify``) or the stage's own check of the values finds it. A file written in place moves its times, and reads
    would refuse it by its hash first."""
    from mlpmem import artifacts

    monkeypatch.setattr(artifacts, "SMALL_FILE_BYTES", 0)
    monkeypatch.setattr(artifacts.FileRecord, "same_identity", lambda self, st: True)
