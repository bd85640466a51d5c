"""Disk-light datastore (--keys streamed): values only on disk, keys recomputed by the LM equal the extracted
ones, the index holds exactly the streamed keys, targets equal a naive p_kNN over PQ distances, bytes reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlpmem.artifacts import RunDir
from mlpmem.config import DatastoreConfig, IndexConfig, TargetsConfig, TrainMemoryConfig
from mlpmem.errors import UsageError
from mlpmem.knn.datastore import build_datastore
from mlpmem.knn.index import build_index, load_index
from mlpmem.knn.stream import key_source
from mlpmem.knn.targets import build_targets
from mlpmem.memory.train import train_memory

from conftest import make_tiny_run

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

FACTORY = "IVF8,PQ8"  # d = 32: 4-dim sub-vectors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run with a stored (float32) and a streamed datastore, each with an IVF-PQ index."""
    root = tmp_path_factory.mktemp("streamed")
    stored = make_tiny_run(root / "stored", n_train=1500)
    streamed = root / "streamed"
    shutil.copytree(stored, streamed)
    build_datastore(DatastoreConfig(run_dir=stored, key_dtype="float32", chunk_windows=8))
    build_datastore(DatastoreConfig(run_dir=streamed, keys="streamed"))
    build_index(IndexConfig(run_dir=streamed, factory=FACTORY, train_size=1000, add_chunk=300, nprobe=4))
    return stored, streamed


def test_streamed_datastore_stores_values_only(runs):
    stored, streamed = (RunDir(r).require("datastore") for r in runs)
    assert set(streamed.arrays) == {"values"} and streamed.key_dim == stored.key_dim == 32
    values = [RunDir(r).array("datastore", "values") for r in runs]
    np.testing.assert_array_equal(values[0], values[1])
    n = stored.entries
    assert streamed.disk_bytes == 4 * n and stored.disk_bytes == n * (4 * 32 + 4)


def test_recomputed_keys_equal_extracted_keys(runs):
    ds = RunDir(runs[1]).require("datastore")
    source = key_source(runs[1], ds)
    extracted = np.asarray(RunDir(runs[0]).array("datastore", "keys"))  # [N, d] float32
    ranges = source.ranges(200)
    assert ranges[0][0] == 0 and ranges[-1][1] == ds.entries
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # contiguous
    np.testing.assert_allclose(source.range(0, ds.entries), extracted, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(source.range(437, 911), extracted[437:911], atol=1e-4, rtol=1e-4)
    sample = source.sample(300, seed=0)
    assert sample.shape == (300, 32)
    # every sampled key is one of the extracted keys
    nearest = ((sample[:, None, :] - extracted[None]) ** 2).sum(-1).min(axis=1)
    assert nearest.max() < 1e-6


def test_index_holds_exactly_the_streamed_keys(runs):
    index, manifest = load_index(runs[1])
    datastore = RunDir(runs[1]).require("datastore")
    assert manifest.factory == FACTORY and manifest.ntotal == index.ntotal == datastore.entries
    keys = key_source(runs[1], datastore).range(0, index.ntotal)
    reference = faiss.clone_index(index)
    reference.reset()
    reference.add(keys)  # the same trained quantizers, the keys added in one go
    queries = keys[::7] + 0.01
    np.testing.assert_array_equal(index.search(queries, 10)[1], reference.search(queries, 10)[1])
    np.testing.assert_array_equal(index.search(queries, 10)[0], reference.search(queries, 10)[0])


def test_targets_are_a_naive_pknn_over_pq_distances(runs):
    k, temperature = 6, 3.0
    manifest = build_targets(TargetsConfig(run_dir=runs[1], k=k, knn_temperature=temperature, chunk_size=500))
    run = RunDir(runs[1])
    index, _ = load_index(runs[1])
    keys = np.asarray(RunDir(runs[0]).array("datastore", "keys"))  # the queries, extracted independently
    values = np.asarray(run.array("datastore", "values"))
    dists, ids = index.search(keys, k + 1)
    tokens, probs = run.array("targets", "tokens"), run.array("targets", "probs")
    for i in range(0, manifest.entries, 37):
        keep = [j for j in range(k + 1) if ids[i, j] != i][:k]
        weights = np.exp(-(dists[i, keep] - dists[i, keep].min()) / temperature)
        expected: dict[int, float] = {}
        for j, w in zip(keep, weights):
            expected[int(values[ids[i, j]])] = expected.get(int(values[ids[i, j]]), 0.0) + w / weights.sum()
        got = {int(t): float(p) for t, p in zip(tokens[i], probs[i]) if t >= 0}
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[t] for t in expected], list(expected.values()), rtol=1e-4, atol=1e-6)
    assert manifest.disk_bytes == sum(f.bytes for f in manifest.files.values()) > 0


def test_memory_trains_online_only_with_targets_searched_per_batch(runs, tmp_path):
    light = Path(shutil.copytree(runs[1], tmp_path / "light"))
    shutil.rmtree(light / "targets", ignore_errors=True)
    build_targets(TargetsConfig(run_dir=light, k=6, knn_temperature=3.0, store=False))
    with pytest.raises(UsageError) as err:
        train_memory(TrainMemoryConfig(run_dir=light, mode="offline", valid_size=100, epochs=0.1))
    assert err.value.field == "mode"
    manifest = train_memory(
        TrainMemoryConfig(run_dir=light, mode="online", valid_size=100, epochs=0.2, batch_size=256, n_blocks=1)
    )
    assert manifest.status == "complete" and manifest.steps >= 1 and np.isfinite(manifest.valid["loss"])


def test_uncompressed_index_of_streamed_keys_is_refused(tmp_path):
    run = make_tiny_run(tmp_path / "run", n_train=400)
    build_datastore(DatastoreConfig(run_dir=run, keys="streamed"))
    with pytest.raises(UsageError) as err:
        build_index(IndexConfig(run_dir=run, factory="Flat"))
    assert err.value.field == "factory" and not (run / "index.partial").exists()


def test_targets_searched_per_batch_train_the_same_memory(runs, tmp_path):
    stored = Path(shutil.copytree(runs[0], tmp_path / "stored"))
    build_index(IndexConfig(run_dir=stored, factory=FACTORY, train_size=1000, nprobe=4))
    searched = Path(shutil.copytree(stored, tmp_path / "searched"))
    build_targets(TargetsConfig(run_dir=stored, k=6, knn_temperature=3.0))
    manifest = build_targets(TargetsConfig(run_dir=searched, k=6, knn_temperature=3.0, store=False))
    assert not manifest.stored and manifest.arrays == {} and manifest.disk_bytes == 0
    # compared in float32 (no autocast): stored and searched targets must train the same weights on every CPU
    train = dict(
        mode="offline", valid_size=100, epochs=0.5, batch_size=128, n_blocks=1, eval_interval=5, dtype="float32"
    )
    results = [train_memory(TrainMemoryConfig(run_dir=r, **train)) for r in (stored, searched)]
    assert results[0].steps == results[1].steps >= 5
    for key in ("loss", "kl", "ce"):
        assert results[0].valid[key] == pytest.approx(results[1].valid[key], rel=1e-5)
    weights = [load_file(r / "train-memory" / "model" / "model.safetensors") for r in (stored, searched)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-6)
