"""FAISS index: exact search equals brute force; the IVF-PQ path builds, searches and re-ranks; mismatches refused."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from mlpmem.artifacts import RunDir
from mlpmem.config import IndexConfig
from mlpmem.errors import UsageError
from mlpmem.knn.index import build_index, default_factory, load_index, set_nprobe
from mlpmem.knn.search import rerank_exact, search

from knn_helpers import random_datastore, write_datastore

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def brute_force(keys, queries, k):
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)  # [Q, N]
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


def test_default_factory_rules():
    assert default_factory(1000, 256, flat_threshold=200_000, train_size=262_144) == "Flat"
    assert default_factory(1_000_000, 256, 200_000, 262_144) == "IVF4096,PQ32"
    # WikiText-103 with GPT-2 large keys: the reference 4096 lists and 64-byte codes
    assert default_factory(103_000_000, 1280, 200_000, 262_144) == "IVF4096,PQ64"
    assert default_factory(3000, 32, 1000, 262_144) == "IVF64,PQ16"  # lists capped by 39 training points each
    assert default_factory(300_000, 33, 200_000, 262_144) == "IVF2048,Flat"


def test_flat_index_returns_true_neighbours(tmp_path):
    keys, values = random_datastore(n=400, d=8)
    write_datastore(tmp_path, keys.astype(np.float16), values)
    manifest = build_index(IndexConfig(run_dir=tmp_path))
    assert manifest.factory == "Flat" and manifest.ntotal == 400 and manifest.nlist is None
    assert manifest.nprobe is None and manifest.peak_rss_mb > 0 and manifest.built_on_gpu is False
    assert manifest.files["index.faiss"].bytes == (tmp_path / "index" / "index.faiss").stat().st_size > 400 * 8 * 4
    index, loaded = load_index(tmp_path)
    assert loaded.fingerprint == manifest.fingerprint and index.d == 8
    queries = np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32) * 3
    dists, ids = search(index, queries, k=7, batch=16)
    ref_d, ref_ids = brute_force(keys.astype(np.float16).astype(np.float32), queries, 7)
    assert dists.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-4, atol=1e-3)
    # a second call finds the stage complete and does nothing
    assert build_index(IndexConfig(run_dir=tmp_path)).fingerprint == manifest.fingerprint


def test_ivfpq_builds_searches_and_reranks(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)) * 4
    keys = (centres[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, 32))).astype(np.float16)
    write_datastore(tmp_path, keys, rng.integers(0, 50, 3000).astype(np.int32))
    manifest = build_index(IndexConfig(run_dir=tmp_path, flat_threshold=1000, train_size=2000))
    assert manifest.factory == "IVF32,PQ16" and manifest.nlist == 32 and manifest.nprobe == 32
    index, _ = load_index(tmp_path)
    assert faiss.extract_index_ivf(index).nprobe == 32
    set_nprobe(index, 4)
    assert faiss.extract_index_ivf(index).nprobe == 4
    queries = np.asarray(keys[:100], dtype=np.float32) + rng.normal(size=(100, 32)).astype(np.float32) * 0.1
    dists, ids = search(index, queries, k=10, nprobe=32)
    ref_d, ref_ids = brute_force(np.asarray(keys, dtype=np.float32), queries, 10)
    recall = np.mean([ref_ids[i, 0] in ids[i] for i in range(100)])
    assert recall >= 0.9
    # exact re-ranking: distances recomputed from stored keys, sorted, missing ids last
    ids[0, -1] = -1
    new_d, new_ids = rerank_exact(queries, ids, keys, max_floats=32 * 10 * 7)
    assert new_ids[0, -1] == -1 and np.isinf(new_d[0, -1])
    assert (np.diff(new_d, axis=1) >= 0).all()
    for i in range(100):
        ok = new_ids[i] >= 0
        expected = ((np.asarray(keys[new_ids[i][ok]], dtype=np.float64) - queries[i]) ** 2).sum(-1)
        np.testing.assert_allclose(new_d[i][ok], expected, rtol=1e-5, atol=1e-4)
        assert sorted(new_ids[i].tolist()) == sorted(ids[i].tolist())


def test_index_over_another_datastore_is_refused(tmp_path):
    keys, values = random_datastore(n=100, d=8)
    write_datastore(tmp_path, keys, values, tag="first")
    build_index(IndexConfig(run_dir=tmp_path))
    write_datastore(tmp_path, keys[:90], values[:90], tag="second")
    with pytest.raises(UsageError, match="index was built from another version of datastore") as err:
        load_index(tmp_path)
    assert "\n" not in str(err.value)


def test_index_file_that_does_not_fit_the_datastore_is_refused(tmp_path):
    """An index of the right size but another width (its hash recorded as if it were the stage's own)."""
    keys, values = random_datastore(n=100, d=8)
    write_datastore(tmp_path, keys, values)
    manifest = build_index(IndexConfig(run_dir=tmp_path))
    run = RunDir(tmp_path)
    # rebuild the index stage with another config and an index of width 4 in place of the real one
    build = run.begin("index", IndexConfig(seed=1), dict(manifest.inputs))
    faiss.write_index(faiss.IndexFlatL2(4), str(build.dir / "index.faiss"))
    build.complete(factory="Flat", ntotal=0, built_on_gpu=False)
    with pytest.raises(UsageError, match="holds 0 keys of width 4, the datastore 100 of width 8") as err:
        load_index(tmp_path)
    assert "\n" not in str(err.value)


def test_search_mismatches_are_refused(tmp_path):
    keys, values = random_datastore(n=100, d=8)
    write_datastore(tmp_path, keys, values)
    build_index(IndexConfig(run_dir=tmp_path))
    index, _ = load_index(tmp_path)
    with pytest.raises(UsageError, match="query width 16 does not match the index dimension 8"):
        search(index, np.zeros((3, 16), np.float32), k=2)
    with pytest.raises(UsageError, match=r"k \(101\) is larger than the datastore \(100 entries\)") as err:
        search(index, np.zeros((3, 8), np.float32), k=101)
    assert err.value.field == "k" and err.value.for_cli().startswith("--k: ")


def test_bad_factory_is_one_line(tmp_path):
    keys, values = random_datastore(n=100, d=8)
    write_datastore(tmp_path, keys, values)
    with pytest.raises(UsageError, match="'IVFbogus' is not a FAISS factory string") as err:
        build_index(IndexConfig(run_dir=tmp_path, factory="IVFbogus"))
    assert err.value.field == "factory" and "\n" not in err.value.for_cli()
    assert not (tmp_path / "index.partial").exists()


def test_too_many_lists_are_refused_and_keep_the_finished_index(tmp_path):
    keys, values = random_datastore(n=100, d=8)
    write_datastore(tmp_path, keys, values)
    built = build_index(IndexConfig(run_dir=tmp_path))
    before = (tmp_path / "index" / "index.faiss").read_bytes()
    with pytest.raises(UsageError, match="has 1000 lists but only 100 keys") as err:
        build_index(IndexConfig(run_dir=tmp_path, factory="IVF1000,Flat"))
    assert err.value.field == "factory"
    assert (tmp_path / "index" / "index.faiss").read_bytes() == before
    assert RunDir(tmp_path).require("index").fingerprint == built.fingerprint


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_keys_damaged_after_the_datastore_are_blamed_on_the_file_not_the_factory(tmp_path, factory, bit_rot):
    """A nan in keys.bin that reads do not see (bit rot: same size and identity, so only a full hash would see
    it) is named with its entry; the factory is not blamed (IVF: the training sample holds it; Flat: adding it)."""
    keys, values = random_datastore(n=400, d=8)
    write_datastore(tmp_path, keys.astype(np.float16), values)
    damaged = np.memmap(tmp_path / "datastore" / "keys.bin", dtype=np.float16, mode="r+", shape=(400, 8))
    damaged[17, 3] = np.nan
    damaged.flush()
    with pytest.raises(UsageError) as err:
        build_index(IndexConfig(run_dir=tmp_path, factory=factory, train_size=400))
    assert err.value.field is None and "\n" not in str(err.value)
    assert str(err.value).startswith("datastore entry 17 (1 of the 400 read) holds nan/inf keys")
    assert "keys.bin was damaged after it was written (`mlpmem verify" in str(err.value)
    assert str(err.value).endswith(f"remove {tmp_path / 'datastore'} and rerun `mlpmem datastore`")
    assert not (tmp_path / "index").exists()
