"""Datastore extraction: keys equal the hook on a plain forward, values are the next tokens, resume is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mlpmem.knn.datastore as datastore_mod
from mlpmem.artifacts import RunDir, read_json
from mlpmem.config import DatastoreConfig, PrepareConfig, TrainLMConfig
from mlpmem.errors import UsageError
from mlpmem.knn.datastore import build_datastore
from mlpmem.lm.keys import KeyHook
from mlpmem.lm.load import load_lm, model_fingerprint, run_lm_dir

from conftest import TINY_VOCAB, make_tiny_run, tiny_gpt2

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def hook_keys(run_dir, tokens: np.ndarray) -> np.ndarray:
    """Keys of one plain forward over ``tokens`` through the full model (LM head included), [T, d]."""
    model = load_lm(run_lm_dir(run_dir))
    with KeyHook(model) as hook, torch.no_grad():
        model(torch.from_numpy(tokens.astype(np.int64))[None])
    return hook.keys[0].numpy()


def test_one_window_covers_the_split(tmp_path):
    run = make_tiny_run(tmp_path / "run", n_train=200, n_eval=60)
    manifest = build_datastore(DatastoreConfig(run_dir=run, split="valid", key_dtype="float32"))
    tokens = np.asarray(RunDir(run).array("prepare", "valid"))
    keys, values = RunDir(run).array("datastore", "keys"), RunDir(run).array("datastore", "values")
    assert manifest.status == "complete" and manifest.entries == 59 and manifest.context == 64 and manifest.windows == 1
    assert manifest.key_layer == "transformer.h.1.ln_2" and manifest.key_dim == 32 and manifest.stride == 32
    assert keys.shape == (59, 32) and keys.dtype == np.float32 and values.dtype == np.int32
    np.testing.assert_array_equal(values, tokens[1:])
    np.testing.assert_allclose(keys, hook_keys(run, tokens)[:-1], rtol=1e-5, atol=1e-5)
    lm = RunDir(run).read("train-lm")
    assert manifest.model_fingerprint == lm.model_fingerprint
    assert manifest.inputs == {"prepare": RunDir(run).read("prepare").fingerprint, "train-lm": lm.fingerprint}
    assert manifest.files["keys.bin"].bytes == 59 * 32 * 4 and not (run / "datastore.partial").exists()


def test_sliding_windows_give_each_position_its_window(tiny_run):
    """Context 64, stride 32: position p >= 63 is keyed in the window starting at 32 * ((p - 31) // 32)."""
    manifest = build_datastore(DatastoreConfig(run_dir=tiny_run, batch_size=5, chunk_windows=7))
    tokens = np.asarray(RunDir(tiny_run).array("prepare", "train"))
    keys, values = RunDir(tiny_run).array("datastore", "keys"), RunDir(tiny_run).array("datastore", "values")
    assert keys.dtype == np.float16 and keys.shape == (2999, 32) and manifest.entries == 2999
    np.testing.assert_array_equal(values, tokens[1:])
    for p in (0, 40, 62, 63, 64, 94, 95, 1000, 2980, 2998):
        begin = 0 if p < 63 else 32 * ((p - 31) // 32)
        expected = hook_keys(tiny_run, tokens[begin : begin + 64])[p - begin]
        np.testing.assert_allclose(keys[p].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


class Killed(Exception):
    pass


def test_killed_and_resumed_is_identical_and_complete_is_skipped(tmp_path, monkeypatch):
    whole = make_tiny_run(tmp_path / "whole", n_train=700)
    killed = make_tiny_run(tmp_path / "killed", n_train=700)
    config = dict(context=32, stride=16, batch_size=3, chunk_windows=4)  # 2 forward batches per chunk
    real_forward, calls, die_at = datastore_mod.forward_windows, [], [7]

    def counting_forward(*args, **kwargs):
        for out in real_forward(*args, **kwargs):  # one forward batch per item
            calls.append(1)
            if len(calls) == die_at[0]:  # inside the 4th chunk
                raise Killed
            yield out

    monkeypatch.setattr(datastore_mod, "forward_windows", counting_forward)
    with pytest.raises(Killed):
        build_datastore(DatastoreConfig(run_dir=killed, **config))
    assert not (killed / "datastore").exists()
    assert read_json(killed / "datastore.partial" / "progress.json")["done"] == [0, 1, 2]
    die_at[0] = -1
    calls.clear()
    build_datastore(DatastoreConfig(run_dir=whole, **config))
    n_whole = len(calls)
    calls.clear()
    resumed = build_datastore(DatastoreConfig(run_dir=killed, **config))
    assert len(calls) == n_whole - 6  # the 3 chunks done before the kill are skipped
    timings = resumed.timings  # built in two attempts: the wall time of both is kept beside the last one's
    assert timings["attempts"] == 2 and timings["since_first_start"] >= timings["seconds"]
    assert read_json(whole / "datastore" / "manifest.json")["timings"]["attempts"] == 1
    for name in ("keys", "values"):
        assert (killed / "datastore" / f"{name}.bin").read_bytes() == (whole / "datastore" / f"{name}.bin").read_bytes()
    calls.clear()
    assert build_datastore(DatastoreConfig(run_dir=killed, **config)).fingerprint == resumed.fingerprint
    assert calls == []  # complete: nothing recomputed


@pytest.mark.parametrize("damage", ["progress_claims_every_chunk", "zeroed_chunk", "progress_not_json"])
def test_a_resume_trusts_only_chunks_whose_rows_match_their_digest(tmp_path, monkeypatch, damage):
    """Killed after 3 chunks, then datastore.partial/ damaged: progress.json edited to claim every chunk done
    (before: a complete datastore of zero rows), chunk 0's keys zeroed, or progress.json garbled. The resume
    computes again every chunk whose rows do not match the digest recorded with them: the same bytes as an
    uninterrupted build."""
    whole = make_tiny_run(tmp_path / "whole", n_train=700)
    killed = make_tiny_run(tmp_path / "killed", n_train=700)
    config = dict(context=32, stride=16, batch_size=3, chunk_windows=4)  # 2 forward batches per chunk
    build_datastore(DatastoreConfig(run_dir=whole, **config))
    real_forward, calls = datastore_mod.forward_windows, []

    def counting_forward(*args, **kwargs):
        for out in real_forward(*args, **kwargs):
            calls.append(1)
            if len(calls) == 7:  # inside the 4th chunk
                raise Killed
            yield out

    monkeypatch.setattr(datastore_mod, "forward_windows", counting_forward)
    with pytest.raises(Killed):
        build_datastore(DatastoreConfig(run_dir=killed, **config))
    partial = killed / "datastore.partial"
    progress = read_json(partial / "progress.json")
    n_chunks = -(-RunDir(whole).read("datastore").windows // 4)
    if damage == "progress_claims_every_chunk":
        (partial / "progress.json").write_text(json.dumps({**progress, "done": list(range(n_chunks))}))
    elif damage == "zeroed_chunk":
        with open(partial / "keys.bin", "r+b") as fh:
            fh.write(bytes(64))
    else:
        (partial / "progress.json").write_text('{"done": [0, 1')
    chunks = []

    def chunk_forward(*args, **kwargs):  # called once per chunk computed
        chunks.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(datastore_mod, "forward_windows", chunk_forward)
    build_datastore(DatastoreConfig(run_dir=killed, **config))
    redone = {"progress_claims_every_chunk": n_chunks - 3, "zeroed_chunk": n_chunks - 2, "progress_not_json": n_chunks}
    assert len(chunks) == redone[damage]
    for name in ("keys", "values"):
        assert (killed / "datastore" / f"{name}.bin").read_bytes() == (whole / "datastore" / f"{name}.bin").read_bytes()


def test_bad_inputs_are_one_line(tiny_run):
    with pytest.raises(UsageError) as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run, context=128))
    assert err.value.for_cli() == "--context: context (128) exceeds the model's 64 positions"
    assert not (tiny_run / "datastore.partial").exists()  # refused before any write


def test_lm_trained_on_another_prepare_is_refused(tiny_run):
    """prepare rebuilt (another corpus) after train-lm: the LM no longer belongs to the run's tokens."""
    run = RunDir(tiny_run)
    build = run.begin("prepare", PrepareConfig(corpus="another", train_tokenizer=TINY_VOCAB * 3), {})
    for split in ("train", "valid", "test"):
        build.add_array(split, "uint16", (100,))[:] = np.arange(100) % TINY_VOCAB
    build.complete(source="synthetic", tokenizer_fingerprint="another", vocab_size=TINY_VOCAB)
    with pytest.raises(UsageError, match="train-lm was built from another version of prepare") as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run))
    assert "\n" not in str(err.value)


def test_tokens_beyond_the_lm_vocabulary_are_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    build = run.begin("prepare", PrepareConfig(corpus="big-vocab", train_tokenizer=TINY_VOCAB * 3), {})
    for split in ("train", "valid", "test"):
        build.add_array(split, "uint16", (200,))[:] = np.arange(200) % (2 * TINY_VOCAB)
    prep = build.complete(source="synthetic", tokenizer_fingerprint="big", vocab_size=2 * TINY_VOCAB)
    lm = run.begin("train-lm", TrainLMConfig(n_layer=2, n_head=2, n_embd=32, context=64), {"prepare": prep.fingerprint})
    tiny_gpt2().save_pretrained(lm.dir / "model")
    lm.complete(model_fingerprint=model_fingerprint(lm.dir / "model"))
    with pytest.raises(UsageError, match=f"use {2 * TINY_VOCAB} ids but the LM has only {TINY_VOCAB}") as err:
        build_datastore(DatastoreConfig(run_dir=run.path))
    assert "\n" not in str(err.value)


def test_a_damaged_token_file_is_one_line_and_exit_2(tiny_run, capsys, bit_rot):
    """An id beyond the vocabulary in the middle of prepare/train.bin (bit rot: a read does not rehash it):
    refused by the forward core with the file named, not an IndexError inside the embedding."""
    from mlpmem.cli import main

    tokens = np.memmap(tiny_run / "prepare" / "train.bin", dtype=np.uint16, mode="r+")
    tokens[1700] = TINY_VOCAB + 3
    tokens.flush()
    assert main(["datastore", "--run-dir", str(tiny_run), "--device", "cpu"]) == 2
    out = capsys.readouterr().err
    err = out.splitlines()[-1]  # after the progress bar
    assert err.startswith("mlpmem: error: ") and "Traceback" not in out
    assert f"train.bin holds token id {TINY_VOCAB + 3}, outside the vocabulary [0, {TINY_VOCAB})" in err
    assert not (tiny_run / "datastore").exists()


def test_lm_with_nan_weights_is_refused(tiny_run):
    """NaN weights written into the trained LM: refused (by its content hash) before any key is stored."""
    model = load_lm(run_lm_dir(tiny_run))
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    model.save_pretrained(tiny_run / "train-lm" / "model")
    with pytest.raises(UsageError, match="does not match its recorded content hash") as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run))
    assert "\n" not in str(err.value) and not (tiny_run / "datastore.partial").exists()


def test_nan_keys_stop_the_stage(tiny_run, monkeypatch):
    """An LM that gives nan keys (past the load-time check): one line, nothing marked done or complete."""
    real_load = datastore_mod.load_lm

    def load_broken(*args, **kwargs):
        model = real_load(*args, **kwargs)
        with torch.no_grad():
            model.transformer.h[1].ln_2.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(datastore_mod, "load_lm", load_broken)
    with pytest.raises(UsageError, match="nan/inf keys") as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run))
    assert "\n" not in str(err.value)
    assert not (tiny_run / "datastore").exists()
    assert not (tiny_run / "datastore.partial" / "progress.json").exists()


def test_unknown_key_layer_names_the_flag(tiny_run):
    with pytest.raises(UsageError, match="'transformer.h.9.ln_2': the model has no such module") as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run, key_layer="transformer.h.9.ln_2"))
    assert err.value.for_cli().startswith("--key-layer: ")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo): chunks shared by rank, same bytes as a single process."""
    one, two = make_tiny_run(tmp_path / "one"), make_tiny_run(tmp_path / "two")
    build_datastore(DatastoreConfig(run_dir=one, chunk_windows=5, batch_size=4))
    script = (
        "import sys; from pathlib import Path; from mlpmem.config import DatastoreConfig; "
        "from mlpmem.knn.datastore import build_datastore; "
        "build_datastore(DatastoreConfig(run_dir=Path(sys.argv[1]), chunk_windows=5, batch_size=4))"
    )
    (tmp_path / "launch.py").write_text(script)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(tmp_path / "launch.py"), str(two)],
        check=True,
        env=env,
        timeout=300,
    )
    assert RunDir(two).read("datastore").status == "complete"
    for name in ("keys", "values"):
        assert (one / "datastore" / f"{name}.bin").read_bytes() == (two / "datastore" / f"{name}.bin").read_bytes()


def test_key_layer_outside_the_backbone(tmp_path):
    """--key-layer lm_head: the full model runs (not only its backbone) and keys are the logits."""
    run = make_tiny_run(tmp_path / "run", n_train=200, n_eval=30)
    manifest = build_datastore(DatastoreConfig(run_dir=run, split="valid", key_layer="lm_head", key_dtype="float32"))
    assert manifest.key_dim == 96
    tokens = np.asarray(RunDir(run).array("prepare", "valid"))
    with torch.no_grad():
        logits = load_lm(run_lm_dir(run))(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, :-1]
    np.testing.assert_allclose(RunDir(run).array("datastore", "keys"), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_stride_equal_to_context_is_refused(tiny_run):
    from mlpmem.config import DatastoreConfig
    from mlpmem.errors import UsageError
    from mlpmem.knn.datastore import build_datastore

    with pytest.raises(UsageError, match=r"stride \(32\) must be smaller than context \(32\)") as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run, context=32, stride=32, device="cpu"))
    assert err.value.field == "stride"
