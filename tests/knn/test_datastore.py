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
from conftest import make_tiny_run

import mlpmem.knn.datastore as datastore_mod
from mlpmem.artifacts import Stage, open_array
from mlpmem.config import DatastoreConfig
from mlpmem.errors import UsageError
from mlpmem.knn.datastore import build_datastore
from mlpmem.lm.keys import KeyHook
from mlpmem.lm.load import load_lm, run_lm_dir


def hook_keys(run_dir, tokens: np.ndarray) -> np.ndarray:
    """Keys of one plain forward over ``tokens`` through the full model (LM head included), [T, d]."""
    model = load_lm(run_lm_dir(run_dir))
    with KeyHook(model) as hook, torch.no_grad():
        model(torch.from_numpy(tokens.astype(np.int64))[None])
    return hook.keys[0].numpy()


def test_one_window_covers_the_split(tmp_path):
    run = make_tiny_run(tmp_path / "run", n_train=200, n_eval=60)
    manifest = build_datastore(DatastoreConfig(run_dir=run, split="valid", key_dtype="float32"))
    tokens = np.asarray(open_array(run, "prepare", "valid"))
    keys, values = open_array(run, "datastore", "keys"), open_array(run, "datastore", "values")
    assert manifest["status"] == "complete" and manifest["entries"] == 59 and manifest["context"] == 64
    assert manifest["key_layer"] == "transformer.h.1.ln_2" and manifest["key_dim"] == 32 and manifest["stride"] == 32
    assert keys.shape == (59, 32) and keys.dtype == np.float32 and values.dtype == np.int32
    np.testing.assert_array_equal(values, tokens[1:])
    np.testing.assert_allclose(keys, hook_keys(run, tokens)[:-1], rtol=1e-5, atol=1e-5)
    lm = json.loads((run / "lm" / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == lm["model_fingerprint"]
    assert manifest["inputs"] == {"prepare": Stage(run, "prepare").read()["fingerprint"], "lm": lm["fingerprint"]}


def test_sliding_windows_give_each_position_its_window(tiny_run):
    """Context 64, stride 32: position p >= 63 is keyed in the window starting at 32 * ((p - 31) // 32)."""
    manifest = build_datastore(DatastoreConfig(run_dir=tiny_run, batch_size=5, chunk_windows=7))
    tokens = np.asarray(open_array(tiny_run, "prepare", "train"))
    keys, values = open_array(tiny_run, "datastore", "keys"), open_array(tiny_run, "datastore", "values")
    assert keys.dtype == np.float16 and keys.shape == (2999, 32) and manifest["entries"] == 2999
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
    real_fill, calls, die_at = datastore_mod._fill, [], [7]

    def counting_fill(*args, **kwargs):
        calls.append(1)
        if len(calls) == die_at[0]:  # inside the 4th chunk
            raise Killed
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(datastore_mod, "_fill", counting_fill)
    with pytest.raises(Killed):
        build_datastore(DatastoreConfig(run_dir=killed, **config))
    assert Stage(killed, "datastore").done_chunks() == {0, 1, 2}
    die_at[0] = -1
    calls.clear()
    build_datastore(DatastoreConfig(run_dir=whole, **config))
    n_whole = len(calls)
    calls.clear()
    resumed = build_datastore(DatastoreConfig(run_dir=killed, **config))
    assert len(calls) == n_whole - 6  # the 3 chunks done before the kill are skipped
    for name in ("keys", "values"):
        assert (killed / "datastore" / f"{name}.bin").read_bytes() == (whole / "datastore" / f"{name}.bin").read_bytes()
    calls.clear()
    assert build_datastore(DatastoreConfig(run_dir=killed, **config))["fingerprint"] == resumed["fingerprint"]
    assert calls == []  # complete: nothing recomputed


def test_bad_inputs_are_one_line(tiny_run):
    with pytest.raises(UsageError, match=r"--context \(128\) exceeds the model's 64 positions") as err:
        build_datastore(DatastoreConfig(run_dir=tiny_run, context=128))
    assert "\n" not in str(err.value)
    lm = Stage(tiny_run, "lm").read()
    lm["tokenizer_fingerprint"] = "someone-else"
    (tiny_run / "lm" / "manifest.json").write_text(json.dumps(lm))
    with pytest.raises(UsageError, match="another tokenizer"):
        build_datastore(DatastoreConfig(run_dir=tiny_run))


def test_unknown_key_layer_names_the_flag(tiny_run):
    with pytest.raises(UsageError, match="--key-layer 'transformer.h.9.ln_2'"):
        build_datastore(DatastoreConfig(run_dir=tiny_run, key_layer="transformer.h.9.ln_2"))


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
    subprocess.run([str(torchrun), "--nproc_per_node", "2", str(tmp_path / "launch.py"), str(two)], check=True, env=env, timeout=300)
    assert Stage(two, "datastore").read()["status"] == "complete"
    for name in ("keys", "values"):
        assert (one / "datastore" / f"{name}.bin").read_bytes() == (two / "datastore" / f"{name}.bin").read_bytes()


def test_key_layer_outside_the_backbone(tmp_path):
    """--key-layer lm_head: the full model runs (not only its backbone) and keys are the logits."""
    run = make_tiny_run(tmp_path / "run", n_train=200, n_eval=30)
    manifest = build_datastore(DatastoreConfig(run_dir=run, split="valid", key_layer="lm_head", key_dtype="float32"))
    assert manifest["key_dim"] == 96
    tokens = np.asarray(open_array(run, "prepare", "valid"))
    with torch.no_grad():
        logits = load_lm(run_lm_dir(run))(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, :-1]
    np.testing.assert_allclose(open_array(run, "datastore", "keys"), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_stride_equal_to_context_is_refused(tiny_run):
    from mlpmem.config import DatastoreConfig
    from mlpmem.errors import UsageError
    from mlpmem.knn.datastore import build_datastore

    with pytest.raises(UsageError, match="smaller than --context"):
        build_datastore(DatastoreConfig(run_dir=tiny_run, context=32, stride=32, device="cpu"))
