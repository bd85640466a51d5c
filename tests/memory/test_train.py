"""train-memory: learning, offline/online key agreement, kill-and-resume, skip when complete, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from memory_inputs import CONTEXT, KEY_LAYER, STRIDE, datastore_keys, memory_run, memory_run_template  # noqa: F401
from safetensors.torch import load_file

from mlpmem.artifacts import Stage, open_array
from mlpmem.config import TrainMemoryConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import sliding_windows
from mlpmem.errors import UsageError
from mlpmem.lm.load import load_lm, run_lm_dir
from mlpmem.memory import train as train_module
from mlpmem.memory.loss import memory_loss
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig, load_memory
from mlpmem.memory.train import OfflineKeys, OnlineKeys, Targets, recompute_keys, train_memory, units_for_step

VALID = 200
real_load_checkpoint = train_module.load_checkpoint


def config(run, **kw) -> TrainMemoryConfig:
    base = dict(run_dir=run, n_blocks=2, batch_size=64, epochs=2, lr=3e-3, warmup_steps=5, eval_interval=10,
                valid_size=VALID, device="cpu")
    return TrainMemoryConfig(**{**base, **kw})


def dense_kl(logits: np.ndarray, t_tokens: np.ndarray, t_probs: np.ndarray) -> float:
    """Mean KL(p‖q) from a dense target matrix."""
    log_q = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    P = np.zeros_like(log_q)
    rows = np.repeat(np.arange(len(P)), t_tokens.shape[1])
    ok = t_tokens.ravel() >= 0
    P[rows[ok], t_tokens.ravel()[ok]] = t_probs.ravel()[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(P > 0, P * (np.log(P) - log_q), 0.0).sum(1).mean())


def test_training_lowers_validation_kl(memory_run):
    manifest = train_memory(config(memory_run, epochs=3))
    history = manifest["valid_history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == manifest["counts"]["steps"]
    assert manifest["valid"]["kl"] < history[0]["kl"] - 0.5
    # the final valid KL, recomputed from the saved model with a dense reference
    memory = load_memory(memory_run)
    n = manifest["counts"]["entries"]
    ids = np.arange(n - VALID, n)
    keys = torch.from_numpy(np.asarray(open_array(memory_run, "datastore", "keys")[ids], np.float32))
    with torch.no_grad():
        logits = memory(keys).double().numpy()
    t_tokens = np.asarray(open_array(memory_run, "targets", "tokens")[ids])
    t_probs = np.asarray(open_array(memory_run, "targets", "probs")[ids], np.float64)
    assert dense_kl(logits, t_tokens, t_probs) == pytest.approx(manifest["valid"]["kl"], abs=1e-4)
    # what the memory records about itself and its stage
    cfg = memory.config
    ds = Stage(memory_run, "datastore").read()
    assert (cfg.base_model_fingerprint, cfg.key_layer, cfg.knn_temperature, cfg.input_dim, cfg.vocab_size) == (
        ds["model_fingerprint"], KEY_LAYER, 7.0, 32, 96)
    assert manifest["inputs"] == {"datastore": ds["fingerprint"], "targets": Stage(memory_run, "targets").read()["fingerprint"]}
    assert manifest["counts"]["memory_bytes"] == (memory_run / "memory" / "model" / "model.safetensors").stat().st_size
    assert manifest["counts"]["parameters"] == sum(p.numel() for p in memory.parameters())
    assert manifest["head_from_lm"] and manifest["keys_per_s"] > 0
    assert not (memory_run / "memory" / "checkpoints").exists()


def test_offline_and_online_keys_and_loss_agree(memory_run):
    """Same entries: datastore (fp16) keys vs keys recomputed through the online path, and the loss on them."""
    lm = load_lm(run_lm_dir(memory_run))
    tokens = open_split(memory_run, "train")
    windows = sliding_windows(len(tokens), CONTEXT, STRIDE)
    n = len(tokens) - 1
    n_train = n - VALID
    offline = OfflineKeys(memory_run, n_train)
    online = OnlineKeys(lm, KEY_LAYER, tokens, windows, n_train)
    exact, _ = datastore_keys(memory_run)  # float32, one window per forward (the fixture's own loop)

    ids = np.sort(np.random.default_rng(0).choice(n, 300, replace=False))
    torch.testing.assert_close(recompute_keys(lm, KEY_LAYER, tokens, windows, ids, torch.device("cpu")),
                               torch.from_numpy(exact[ids]), rtol=1e-5, atol=1e-5)
    ids_off, keys_off = offline.batch(ids[::-1].copy(), torch.device("cpu"))
    assert np.array_equal(ids_off, ids)
    torch.testing.assert_close(keys_off, torch.from_numpy(exact[ids]), rtol=1e-3, atol=2e-3)  # fp16 rounding

    # an online batch of windows: exactly their scored training positions, keys as in the datastore
    units = np.array([5, 0, 62, 86])  # window 86 reaches into the held-out entries
    ids_on, keys_on = online.batch(units, torch.device("cpu"))
    chosen = [online.windows[u] for u in sorted(units)]
    want = np.concatenate([np.arange(w.first_scored, w.end - 1) for w in chosen])
    assert np.array_equal(ids_on, want[want < n_train]) and (want >= n_train).any()
    _, keys_off = offline.batch(ids_on, torch.device("cpu"))
    torch.testing.assert_close(keys_on, keys_off, rtol=1e-3, atol=2e-3)

    torch.manual_seed(0)
    memory = MLPMemory(MLPMemoryConfig(input_dim=32, hidden_size=32, n_blocks=2, vocab_size=96)).eval()
    targets = Targets(memory_run)
    with torch.no_grad():
        loss_on = memory_loss(memory(keys_on), *targets.rows(ids_on, torch.device("cpu")), 0.5)
        loss_off = memory_loss(memory(keys_off), *targets.rows(ids_on, torch.device("cpu")), 0.5)
    for a, b in zip(loss_on, loss_off):
        assert a.item() == pytest.approx(b.item(), rel=1e-3)


def test_online_training_matches_offline_start(memory_run):
    online = train_memory(config(memory_run, mode="online", epochs=0.5))
    assert online["status"] == "complete" and online["counts"]["steps"] >= 1
    assert online["valid"]["kl"] < online["valid_history"][0]["kl"]
    step0_online = online["valid_history"][0]
    offline = train_memory(config(memory_run, epochs=0.1))  # another config: a fresh stage
    step0_offline = offline["valid_history"][0]
    for k in ("loss", "kl", "ce"):  # same init, same held-out entries: only fp16 key rounding differs
        assert step0_online[k] == pytest.approx(step0_offline[k], rel=1e-3)


def test_units_for_step_covers_each_epoch_once():
    n, per = 23, 5
    drawn = np.concatenate([units_for_step(s, per, n, seed=3) for s in range(14)])  # 70 units: 3 epochs + 1
    for e in range(3):
        assert sorted(drawn[e * n : (e + 1) * n]) == list(range(n))
    assert not np.array_equal(drawn[:n], drawn[n : 2 * n])
    assert np.array_equal(units_for_step(7, per, n, seed=3), drawn[35:40])


def test_killed_and_resumed_equals_uninterrupted(memory_run, tmp_path, monkeypatch):
    other = shutil.copytree(memory_run, tmp_path / "other")
    cfg = dict(epochs=1.5, eval_interval=7)
    reference = train_memory(config(other, **cfg))

    class Killed(Exception):
        pass

    original = train_module.save_checkpoint

    def save_then_die(stage, step, *args, **kw):
        original(stage, step, *args, **kw)
        if step == 14:
            raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_memory(config(memory_run, **cfg))
    assert json.loads((memory_run / "memory" / "checkpoints" / "latest.json").read_text())["step"] == 14
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    restored = []
    monkeypatch.setattr(train_module, "load_checkpoint", lambda *a: restored.append(state := real_load_checkpoint(*a)) or state)
    resumed = train_memory(config(memory_run, **cfg))
    assert restored and restored[0]["step"] == 14

    a = load_file(other / "memory" / "model" / "model.safetensors")
    b = load_file(memory_run / "memory" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["valid_history"] == reference["valid_history"]
    assert resumed["fingerprint"] == reference["fingerprint"]



def test_complete_stage_is_skipped(memory_run, monkeypatch):
    first = train_memory(config(memory_run, epochs=0.2))
    monkeypatch.setattr(train_module, "memory_loss", lambda *a: pytest.fail("trained again"))
    assert train_memory(config(memory_run, epochs=0.2)) == first


def test_without_validation(memory_run):
    manifest = train_memory(config(memory_run, valid_size=0, epochs=0.2))
    assert manifest["valid"] is None and manifest["valid_history"] == []
    assert manifest["counts"]["train_entries"] == manifest["counts"]["entries"]


def test_mismatched_inputs_are_refused(memory_run):
    with pytest.raises(UsageError, match="valid-size"):
        train_memory(config(memory_run, valid_size=10_000))
    tg = Stage(memory_run, "targets")
    manifest = tg.read()
    manifest["inputs"]["datastore"] = "0123456789abcdef"
    (tg.dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="another datastore") as err:
        train_memory(config(memory_run))
    assert "\n" not in str(err.value)
