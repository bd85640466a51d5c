"""train-memory: learning, offline/online key agreement, kill-and-resume, skip when complete, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlpmem.artifacts import RunDir, StageBuild
from mlpmem.config import TargetsConfig, TrainMemoryConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import sliding_windows
from mlpmem.errors import UsageError
from mlpmem.lm.load import load_lm, run_lm_dir
from mlpmem.memory import train as train_module
from mlpmem.memory.loss import memory_loss
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig, check_pairing, load_memory
from mlpmem.memory.train import (
    BatchPlan,
    OfflineKeys,
    OnlineKeys,
    Targets,
    epoch_permutation,
    recompute_keys,
    train_memory,
    units_for_step,
)
from mlpmem.training import MetricsLog

from memory_inputs import CONTEXT, KEY_LAYER, STRIDE, datastore_keys, memory_run, memory_run_template  # noqa: F401

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

VALID = 200
real_load_checkpoint = train_module.load_checkpoint


def config(run, **kw) -> TrainMemoryConfig:
    """A tiny training config. Numbers are compared in float32: training and validation run without autocast, so
    the manifest's losses and a float32 recomputation agree on every CPU (AVX2, AVX-512 bf16, AMX)."""
    base = dict(
        run_dir=run,
        n_blocks=2,
        batch_size=64,
        epochs=2,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=10,
        valid_size=VALID,
        dtype="float32",
        device="cpu",
    )
    return TrainMemoryConfig(**{**base, **kw})


def dense_kl(logits: np.ndarray, t_tokens: np.ndarray, t_probs: np.ndarray) -> float:
    """Mean KL(p‖q) from a dense target matrix."""
    log_q = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    P = np.zeros_like(log_q)
    rows = np.repeat(np.arange(len(P)), t_tokens.shape[1])
    ok = t_tokens.ravel() >= 0
    P[rows[ok], t_tokens.ravel()[ok]] = t_probs.ravel()[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(P > 0, P * (np.log(P) - log_q), 0.0).sum(1).mean())


def test_training_lowers_validation_kl(memory_run):
    manifest = train_memory(config(memory_run, epochs=3))
    history = manifest.valid_history
    assert history[0]["step"] == 0 and history[-1]["step"] == manifest.steps
    assert manifest.valid["kl"] < history[0]["kl"] - 0.5
    # the final valid KL, recomputed from the saved model with a dense reference
    memory = load_memory(memory_run)
    run = RunDir(memory_run)
    n = run.read("datastore").entries
    assert manifest.train_entries == n - VALID and manifest.valid_entries == VALID
    ids = np.arange(n - VALID, n)
    keys = torch.from_numpy(np.asarray(run.array("datastore", "keys")[ids], np.float32))
    with torch.no_grad():
        logits = memory(keys).double().numpy()
    t_tokens = np.asarray(run.array("targets", "tokens")[ids])
    t_probs = np.asarray(run.array("targets", "probs")[ids], np.float64)
    assert dense_kl(logits, t_tokens, t_probs) == pytest.approx(manifest.valid["kl"], abs=1e-4)
    # what the memory records about itself and its stage
    cfg = memory.config
    ds, tg, lm = run.read("datastore"), run.read("targets"), run.read("train-lm")
    assert (cfg.base_model_fingerprint, cfg.key_layer, cfg.knn_temperature, cfg.input_dim, cfg.vocab_size) == (
        lm.model_fingerprint,
        KEY_LAYER,
        7.0,
        32,
        96,
    )
    assert manifest.key_layer == KEY_LAYER
    assert manifest.inputs == {"train-lm": lm.fingerprint, "datastore": ds.fingerprint, "targets": tg.fingerprint}
    size = (memory_run / "train-memory" / "model" / "model.safetensors").stat().st_size
    assert manifest.files["model/model.safetensors"].bytes == manifest.summary()["memory_bytes"] == size
    assert manifest.parameters == sum(p.numel() for p in memory.parameters())
    assert manifest.head_from_lm and manifest.keys_per_s > 0
    assert (
        not (memory_run / "train-memory" / "checkpoints").exists()
        and not (memory_run / "train-memory.partial").exists()
    )


def test_bfloat16_training_reports_the_kl_of_its_own_dtype(memory_run):
    """dtype bfloat16 (native on AVX-512 bf16 / AMX, emulated on AVX2): the manifest's valid KL is the saved
    memory's KL computed under bfloat16 autocast, batch by batch as validation does. Compared in bfloat16: both
    sides run the same kernels, so they agree to float32 summation order; the float32 KL of the same weights is
    within bfloat16's resolution (8 mantissa bits, relative 2^-8 per rounding) of it, not to 1e-4."""
    manifest = train_memory(config(memory_run, epochs=1, dtype="bfloat16"))
    memory = load_memory(memory_run)
    run = RunDir(memory_run)
    n = run.read("datastore").entries
    ids = np.arange(n - VALID, n)
    keys = torch.from_numpy(np.asarray(run.array("datastore", "keys")[ids], np.float32))
    t_tokens = np.asarray(run.array("targets", "tokens")[ids])
    t_probs = np.asarray(run.array("targets", "probs")[ids], np.float64)
    batch = config(memory_run).batch_size
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits_bf16 = torch.cat([memory(keys[i : i + batch]).float() for i in range(0, len(ids), batch)])
    with torch.no_grad():
        logits_fp32 = memory(keys).double().numpy()
    kl_bf16 = dense_kl(logits_bf16.double().numpy(), t_tokens, t_probs)
    assert kl_bf16 == pytest.approx(manifest.valid["kl"], abs=1e-4)
    assert dense_kl(logits_fp32, t_tokens, t_probs) == pytest.approx(manifest.valid["kl"], rel=2**-8)


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
    torch.testing.assert_close(
        recompute_keys(lm, KEY_LAYER, tokens, windows, ids, torch.device("cpu")),
        torch.from_numpy(exact[ids]),
        rtol=1e-5,
        atol=1e-5,
    )
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
    assert online.status == "complete" and online.steps >= 1 and online.key_layer == KEY_LAYER
    assert online.valid["kl"] < online.valid_history[0]["kl"]
    step0_online = online.valid_history[0]
    offline = train_memory(config(memory_run, epochs=0.1))  # another config: a fresh stage
    step0_offline = offline.valid_history[0]
    for k in ("loss", "kl", "ce"):  # same init, same held-out entries: only fp16 key rounding differs
        assert step0_online[k] == pytest.approx(step0_offline[k], rel=1e-3)


def test_units_for_step_covers_each_epoch_once():
    n, per = 23, 5
    drawn = np.concatenate([units_for_step(s, per, n, seed=3) for s in range(14)])  # 70 units: 3 epochs + 1
    for e in range(3):
        assert sorted(drawn[e * n : (e + 1) * n]) == list(range(n))
    assert not np.array_equal(drawn[:n], drawn[n : 2 * n])
    assert np.array_equal(units_for_step(7, per, n, seed=3), drawn[35:40])


def test_units_for_step_draw_each_epoch_from_its_seeded_permutation():
    """The cached per-epoch order is the seeded permutation drawn afresh (runs resume to the same batches), and
    it cannot be changed by a caller."""
    n, per = 23, 5
    drawn = np.concatenate([units_for_step(s, per, n, seed=3) for s in range(14)])
    fresh = np.concatenate([np.random.default_rng([3, e]).permutation(n) for e in range(4)])
    assert np.array_equal(drawn, fresh[:70])
    with pytest.raises(ValueError):
        epoch_permutation(3, 0, n)[0] = 0


def test_online_batches_mix_a_pool_of_windows(memory_run):
    """Pooled online batches: every training entry of the pool's windows once, in batches that mix many windows,
    with the keys a plain recompute gives; two ranks' shares partition the one-process batch."""
    lm = load_lm(run_lm_dir(memory_run))
    tokens = open_split(memory_run, "train")
    windows = sliding_windows(len(tokens), CONTEXT, STRIDE)
    n_train = len(tokens) - 1 - VALID
    source = OnlineKeys(lm, KEY_LAYER, tokens, windows, n_train)
    cpu = torch.device("cpu")
    plan = BatchPlan(per_step=2, n_units=source.n_units, total_steps=10, seed=5, pool_steps=4)
    units = units_for_step(0, 2, source.n_units, seed=5, n_steps=4)  # the first pool: steps 0..3
    batches = [source.step_batch(s, plan, cpu) for s in range(4)]
    ids = np.concatenate([b[0] for b in batches])
    naive = sorted(p for u in units for p in range(windows[u].first_scored, windows[u].end - 1) if p < n_train)
    assert sorted(ids) == naive and len(set(ids)) == len(ids)
    owner = np.searchsorted([w.first_scored for w in source.windows], batches[0][0], side="right") - 1
    assert len(set(owner)) > plan.per_step  # an unpooled batch holds exactly per_step windows
    keys = torch.cat([b[1] for b in batches])
    torch.testing.assert_close(keys, recompute_keys(lm, KEY_LAYER, tokens, windows, ids, cpu), rtol=1e-5, atol=1e-5)

    for step in (1, 9):  # a step of the first pool and one of the last, shorter pool (steps 8, 9)
        whole, _ = source.step_batch(step, plan, cpu)
        shares = [OnlineKeys(lm, KEY_LAYER, tokens, windows, n_train) for _ in range(2)]
        parts = [shares[r].step_batch(step, BatchPlan(**{**plan.__dict__, "rank": r, "world": 2}), cpu) for r in (0, 1)]
        assert sorted(np.concatenate([p[0] for p in parts])) == sorted(whole)
        assert all(len(p[0]) for p in parts)

    # one pool of two epochs: every window drawn twice, every entry trained twice, by one rank or the other
    two = BatchPlan(per_step=2, n_units=source.n_units, total_steps=source.n_units, seed=1, pool_steps=source.n_units)
    whole = np.concatenate([source.step_batch(s, two, cpu)[0] for s in range(two.total_steps)])
    assert np.array_equal(np.sort(whole), np.repeat(np.arange(n_train), 2))
    shares = [OnlineKeys(lm, KEY_LAYER, tokens, windows, n_train) for _ in range(2)]
    plans = [BatchPlan(**{**two.__dict__, "rank": r, "world": 2}) for r in (0, 1)]
    for step in range(two.total_steps):
        parts = [shares[r].step_batch(step, plans[r], cpu)[0] for r in (0, 1)]
        assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(source.step_batch(step, two, cpu)[0]))


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_killed_and_resumed_equals_uninterrupted(memory_run, tmp_path, monkeypatch, mode):
    """Online, the kill falls inside a shuffle pool (5 steps of 64 keys): the resumed run recomputes it."""
    other = shutil.copytree(memory_run, tmp_path / "other")
    cfg = dict(epochs=1.5, eval_interval=7, mode=mode, shuffle_keys=320)
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
    assert json.loads((memory_run / "train-memory.partial" / "checkpoints" / "latest.json").read_text())["step"] == 14
    assert not (memory_run / "train-memory").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    restored = []
    monkeypatch.setattr(
        train_module, "load_checkpoint", lambda *a: restored.append(state := real_load_checkpoint(*a)) or state
    )
    resumed = train_memory(config(memory_run, **cfg))
    assert restored and restored[0]["step"] == 14

    assert same_weights(other, memory_run)
    assert resumed.valid_history == reference.valid_history
    assert resumed.fingerprint == reference.fingerprint
    assert metric_lines(memory_run) == metric_lines(other)  # no step written twice, none lost


def metric_lines(run_dir):
    """metrics.jsonl without its timings: (step, every name, the losses and lr)."""
    records = MetricsLog.read(run_dir / "train-memory" / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} | {"names": sorted(r)} for r in records]


def test_complete_stage_is_skipped(memory_run, monkeypatch):
    first = train_memory(config(memory_run, epochs=0.2))
    monkeypatch.setattr(train_module, "memory_loss", lambda *a: pytest.fail("trained again"))
    again = train_memory(config(memory_run, epochs=0.2, device="auto"))  # a setting: not part of the identity
    assert again.model_dump(mode="json") == first.model_dump(mode="json")


def test_without_validation(memory_run):
    manifest = train_memory(config(memory_run, valid_size=0, epochs=0.2))
    assert manifest.valid is None and manifest.valid_history == []
    assert manifest.train_entries == RunDir(memory_run).read("datastore").entries and manifest.valid_entries == 0


def test_mismatched_inputs_are_refused(memory_run):
    with pytest.raises(UsageError, match=r"valid_size \(10000\) must be smaller") as err:
        train_memory(config(memory_run, valid_size=10_000))
    assert err.value.field == "valid_size"
    run = RunDir(memory_run)
    ds = run.read("datastore")
    # targets with fewer rows, built over the current datastore
    tg = run.begin("targets", TargetsConfig(k=3, width=3), {"datastore": ds.fingerprint})
    for name, dtype, shape in (("tokens", "int32", (10, 3)), ("probs", "float32", (10, 3)), ("gold", "int32", (10,))):
        tg.add_array(name, dtype, shape)
    tg.complete()
    with pytest.raises(UsageError, match=f"the targets have 10 rows, the datastore {ds.entries} entries") as err:
        train_memory(config(memory_run))
    assert "\n" not in str(err.value)
    # the datastore rebuilt after the targets: the targets describe another datastore
    lm = run.read("train-lm")
    rebuilt = run.begin("datastore", ds.config.model_copy(update={"key_dtype": "float32"}), dict(ds.inputs))
    rebuilt.add_array("keys", "float32", (ds.entries, ds.key_dim))
    rebuilt.add_array("values", "int32", (ds.entries,))
    rebuilt.complete(model_fingerprint=lm.model_fingerprint, key_layer=KEY_LAYER, context=CONTEXT, stride=STRIDE)
    with pytest.raises(UsageError, match="targets was built from another version of datastore") as err:
        train_memory(config(memory_run))
    assert "\n" not in str(err.value)
    assert not (memory_run / "train-memory.partial").exists()  # nothing written by a refused command


def same_weights(run_a, run_b) -> bool:
    a = load_file(run_a / "train-memory" / "model" / "model.safetensors")
    b = load_file(run_b / "train-memory" / "model" / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_after_the_final_save_resumes_at_the_end(memory_run, tmp_path, monkeypatch):
    """Killed after the last checkpoint but before the manifest completes: the rerun trains no step again."""
    other = shutil.copytree(memory_run, tmp_path / "other")
    cfg = dict(epochs=1.5, eval_interval=7)
    reference = train_memory(config(other, **cfg))

    real_complete = StageBuild.complete
    killed = []

    def die_once(self, **fields):
        if not killed:
            killed.append(1)
            raise KeyboardInterrupt
        return real_complete(self, **fields)

    monkeypatch.setattr(StageBuild, "complete", die_once)
    with pytest.raises(KeyboardInterrupt):
        train_memory(config(memory_run, **cfg))
    latest = json.loads((memory_run / "train-memory.partial" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == reference.steps and not (memory_run / "train-memory").exists()

    restored, trained = [], []
    monkeypatch.setattr(
        train_module, "load_checkpoint", lambda *a: restored.append(state := real_load_checkpoint(*a)) or state
    )
    real_loss = train_module.memory_loss
    monkeypatch.setattr(
        train_module, "memory_loss", lambda logits, *a: trained.append(torch.is_grad_enabled()) or real_loss(logits, *a)
    )
    resumed = train_memory(config(memory_run, **cfg))
    assert restored and restored[0]["step"] == reference.steps
    assert not any(trained)  # only the final validation ran (no gradients): no training step was repeated
    assert same_weights(other, memory_run)
    assert resumed.valid_history == reference.valid_history and resumed.fingerprint == reference.fingerprint
    assert not (memory_run / "train-memory" / "checkpoints").exists()
    assert metric_lines(memory_run) == metric_lines(other)  # the final validation is not written twice
    valid = [r for r in MetricsLog.read(memory_run / "train-memory" / "metrics.jsonl") if "valid/loss" in r]
    assert [(r["step"], r["valid/kl"]) for r in valid] == [
        (h["step"], pytest.approx(h["kl"], abs=1e-6)) for h in reference.valid_history
    ]


@pytest.mark.parametrize("bad", [{"lr": 1e3}, {"weight_decay": 1e10}])
def test_diverging_training_stops_and_marks_nothing_complete(memory_run, bad):
    with pytest.raises(UsageError, match="diverged|nan") as err:
        train_memory(config(memory_run, warmup_steps=0, epochs=1, **bad))
    assert "\n" not in str(err.value)
    assert not (memory_run / "train-memory").exists()
    assert RunDir(memory_run).read("train-memory", memory_run / "train-memory.partial").status == "running"


# the memory's own key layer (online mode) -----------------------------------------------------------------
def ffn_input_of_block(lm, block: int, ids: torch.Tensor) -> torch.Tensor:
    """ln_2(h + attn(ln_1(h))) of a GPT-2 block, from output_hidden_states and the block's weights by hand."""
    with torch.no_grad():
        h = lm(ids, output_hidden_states=True).hidden_states[block]  # the block's input [B, T, d]
        b = lm.transformer.h[block]
        B, T, d = h.shape
        heads = lm.config.n_head
        q, k, v = b.attn.c_attn(b.ln_1(h)).split(d, dim=2)
        split = lambda x: x.view(B, T, heads, d // heads).transpose(1, 2)  # noqa: E731  [B, heads, T, d/heads]
        scores = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, T, d)
        return b.ln_2(h + b.attn.c_proj(attn))


def reference_keys(run_dir, layer_fn) -> np.ndarray:
    """Keys [N, w] of every datastore entry, one window per forward, from ``layer_fn(lm, ids) -> [1, T, w]``."""
    lm = load_lm(run_lm_dir(run_dir))
    tokens = np.asarray(open_split(run_dir, "train"), dtype=np.int64)
    out = None
    for w in sliding_windows(len(tokens), CONTEXT, STRIDE):
        k = layer_fn(lm, torch.from_numpy(tokens[w.begin : w.end])[None])[0]
        out = np.zeros((len(tokens) - 1, k.shape[-1]), np.float32) if out is None else out
        out[w.first_scored : w.end - 1] = k[w.first_scored - w.begin : w.end - 1 - w.begin].numpy()
    return out


def final_valid_kl(run_dir, keys: np.ndarray) -> float:
    """The saved memory's valid KL on the held-out entries, with the given keys (dense reference)."""
    run = RunDir(run_dir)
    n = run.read("datastore").entries
    ids = np.arange(n - VALID, n)
    with torch.no_grad():
        logits = load_memory(run_dir)(torch.from_numpy(keys[ids])).double().numpy()
    return dense_kl(
        logits,
        np.asarray(run.array("targets", "tokens")[ids]),
        np.asarray(run.array("targets", "probs")[ids], np.float64),
    )


@pytest.mark.parametrize("choice", [{"key_depth": 0.5}, {"key_layer": "transformer.h.0.ln_2"}])
def test_online_memory_reads_its_own_key_layer(memory_run, choice):
    """--key-depth 0.5 of a 2-block LM is block 0's feed-forward input: the memory trains on the LM's keys there."""
    manifest = train_memory(config(memory_run, mode="online", epochs=0.5, **choice))
    memory = load_memory(memory_run)
    assert manifest.key_layer == memory.config.key_layer == "transformer.h.0.ln_2"
    assert RunDir(memory_run).read("datastore").key_layer == KEY_LAYER  # the targets still come from the last block
    lm = load_lm(run_lm_dir(memory_run))
    assert (
        check_pairing(memory.config, lm, RunDir(memory_run).read("train-lm").model_fingerprint)
        == "transformer.h.0.ln_2"
    )
    expected = reference_keys(memory_run, lambda lm, ids: ffn_input_of_block(lm, 0, ids))
    assert not np.allclose(expected, datastore_keys(memory_run)[0], atol=1e-2)  # another layer indeed
    tokens = open_split(memory_run, "train")
    ids = np.sort(np.random.default_rng(1).choice(len(expected), 200, replace=False))
    got = recompute_keys(
        lm, manifest.key_layer, tokens, sliding_windows(len(tokens), CONTEXT, STRIDE), ids, torch.device("cpu")
    )
    torch.testing.assert_close(got, torch.from_numpy(expected[ids]), rtol=1e-5, atol=1e-5)
    assert final_valid_kl(memory_run, expected) == pytest.approx(manifest.valid["kl"], abs=1e-4)


def test_offline_memory_at_another_layer_is_refused(memory_run):
    with pytest.raises(UsageError, match="offline mode reads the datastore's keys") as err:
        train_memory(config(memory_run, key_layer="transformer.h.0.ln_2"))
    assert err.value.field == "mode" and "\n" not in err.value.for_cli()
    assert not (memory_run / "train-memory.partial").exists()
    # naming the datastore's own layer is fine offline
    assert train_memory(config(memory_run, key_depth=1.0, epochs=0.1)).key_layer == KEY_LAYER


def test_online_memory_at_the_lm_head(memory_run):
    """--key-layer lm_head: the forward core runs the full model, keys are the logits (width = vocab size)."""
    manifest = train_memory(config(memory_run, mode="online", key_layer="lm_head", epochs=0.5))
    memory = load_memory(memory_run)
    assert manifest.key_layer == memory.config.key_layer == "lm_head"
    assert memory.config.input_dim == 96 and not manifest.head_from_lm  # head [96, 96] vs the LM's [96, 32]
    assert manifest.valid["kl"] < manifest.valid_history[0]["kl"]
    expected = reference_keys(memory_run, lambda lm, ids: lm(ids).logits.detach())
    assert final_valid_kl(memory_run, expected) == pytest.approx(manifest.valid["kl"], abs=1e-4)


def test_online_key_layer_without_one_tensor_output_is_one_line(memory_run, capsys):
    from mlpmem.cli import main

    argv = ["train-memory", "--run-dir", str(memory_run), "--mode", "online", "--key-layer", "transformer"]
    assert main([*argv, "--device", "cpu", "--valid-size", "200"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlpmem: error: --key-layer: 'transformer' outputs a BaseModel") and err.count("\n") == 1
    assert "transformer.h.0.ln_2 .. transformer.h.1.ln_2" in err
    assert not (memory_run / "train-memory.partial").exists() and not (memory_run / "train-memory").exists()


def test_a_batch_beyond_the_training_entries_is_bounded_by_them(memory_run, tmp_path, caplog):
    """--batch-size 10,000,000 trains exactly as a batch of every training entry (memory bounded by the data)."""
    n_train = RunDir(memory_run).read("datastore").entries - VALID
    other = shutil.copytree(memory_run, tmp_path / "other")
    with caplog.at_level("WARNING", logger="mlpmem"):
        big = train_memory(config(memory_run, batch_size=10_000_000, epochs=2))
    assert f"--batch-size 10000000 exceeds the {n_train} training entries; using {n_train}" in caplog.text
    whole = train_memory(config(other, batch_size=n_train, epochs=2))
    assert big.steps == whole.steps == 2 and big.valid_history == whole.valid_history
    assert same_weights(other, memory_run)


@pytest.mark.parametrize(
    "file,dtype,width,value,message",
    [
        ("targets/probs.bin", np.float32, 6, np.nan, "nan/inf or negative target probabilities"),
        ("targets/tokens.bin", np.int32, 6, 5000, "target token ids outside the LM's 96-token vocabulary"),
        ("targets/gold.bin", np.int32, None, -3, "a gold token outside the LM's 96-token vocabulary"),
        ("datastore/keys.bin", np.float16, 32, np.inf, "holds nan/inf keys"),
    ],
    ids=["probs", "tokens", "gold", "keys"],
)
def test_damaged_inputs_are_named_not_blamed_on_the_learning_rate(
    memory_run, file, dtype, width, value, message, bit_rot
):
    """A value damaged in place that reads do not see (bit rot: same size and identity, so only a full hash sees
    it) is named with its entry and file; before, a nan read as 'diverged: lower --lr' and an out-of-range id
    raised inside the loss."""
    n = RunDir(memory_run).read("datastore").entries
    damaged = np.memmap(memory_run / file, dtype=dtype, mode="r+", shape=(n, width) if width else (n,))
    damaged[5] = value
    damaged.flush()
    with pytest.raises(UsageError) as err:
        train_memory(config(memory_run, epochs=1))
    text = err.value.for_cli()
    assert text.startswith("datastore entry 5 ") and message in text and "\n" not in text
    folder = file.split("/")[0]
    assert f"{memory_run / folder}" in text and f"rerun `mlpmem {folder}`" in text and "--lr" not in text
    assert not (memory_run / "train-memory").exists()


def test_a_checkpoint_with_nan_weights_is_named_not_resumed(memory_run, monkeypatch):
    class Killed(Exception):
        pass

    original = train_module.save_checkpoint

    def save_then_die(stage, step, model, *args, **kw):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")  # the saved weights are damaged
        original(stage, step, model, *args, **kw)
        raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_memory(config(memory_run, epochs=1, eval_interval=3))
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    with pytest.raises(UsageError) as err:
        train_memory(config(memory_run, epochs=1, eval_interval=3))
    checkpoints = memory_run / "train-memory.partial" / "checkpoints"
    assert str(err.value).startswith(f"the checkpoint in {checkpoints / 'step-3'} holds nan/inf weights (")
    assert str(err.value).endswith(f"remove {checkpoints} to restart the stage from step 0")
    assert "--lr" not in str(err.value)
