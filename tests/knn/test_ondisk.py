"""On-disk inverted lists: the same search results as the in-memory index, a killed build resumes to the same
lists, codes added without encoding equal encoded ones."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import mlpmem.knn.stream as stream_mod
from mlpmem.artifacts import RunDir, read_json
from mlpmem.config import IndexConfig
from mlpmem.knn.index import build_index, load_index
from mlpmem.knn.ondisk import LISTS_FILE, add_codes, is_on_disk

from knn_helpers import write_datastore

CONFIG = {"factory": "IVF16,PQ8", "train_size": 1500, "add_chunk": 500, "nprobe": 5}


def clustered_keys(n: int = 2200, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(24, d)) * 4
    keys = (centres[rng.integers(0, 24, n)] + rng.normal(size=(n, d))).astype(np.float16)
    return keys, rng.integers(0, 40, n).astype(np.int32)


def test_on_disk_search_equals_in_memory_search(tmp_path):
    keys, values = clustered_keys()
    for name in ("memory", "disk"):
        write_datastore(tmp_path / name, keys, values)
    memory = build_index(IndexConfig(run_dir=tmp_path / "memory", **CONFIG))
    disk = build_index(IndexConfig(run_dir=tmp_path / "disk", on_disk=True, **CONFIG))
    assert disk.on_disk and not memory.on_disk and disk.ntotal == memory.ntotal == len(keys)
    assert disk.arrays["lists"].file == LISTS_FILE and not (tmp_path / "disk" / "index" / "shards").exists()
    assert disk.disk_bytes == sum(f.bytes for f in disk.files.values())
    (in_memory, _), (on_disk, _) = load_index(tmp_path / "memory"), load_index(tmp_path / "disk")
    assert is_on_disk(on_disk) and not is_on_disk(in_memory)
    queries = np.random.default_rng(1).normal(size=(200, 16)).astype(np.float32) * 4
    d_mem, i_mem = in_memory.search(queries, 20)
    d_disk, i_disk = on_disk.search(queries, 20)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_array_equal(d_disk, d_mem)


class Killed(Exception):
    pass


@pytest.mark.parametrize("damage", [None, "shard_changed", "progress_claims_every_chunk"])
def test_killed_on_disk_build_resumes_to_the_same_lists(tmp_path, monkeypatch, damage):
    """Killed after 2 of 5 chunks; then, maybe, shard 0 changed or progress.json edited to claim every chunk:
    a shard that does not match the hash recorded when it was written is built again."""
    keys, values = clustered_keys()
    for name in ("whole", "killed"):
        write_datastore(tmp_path / name, keys, values)
    build_index(IndexConfig(run_dir=tmp_path / "whole", on_disk=True, **CONFIG))
    real, calls = stream_mod.StoredKeys.range, []

    def dying(self, a, b):
        calls.append(a)
        if len(calls) == 3:
            raise Killed
        return real(self, a, b)

    monkeypatch.setattr(stream_mod.StoredKeys, "range", dying)
    with pytest.raises(Killed):
        build_index(IndexConfig(run_dir=tmp_path / "killed", on_disk=True, **CONFIG))
    partial = tmp_path / "killed" / "index.partial"
    progress = read_json(partial / "shards" / "progress.json")
    assert progress["done"] == [0, 1]
    if damage == "shard_changed":
        shard = partial / "shards" / "000000.lists"
        shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    elif damage == "progress_claims_every_chunk":
        (partial / "shards" / "progress.json").write_text(json.dumps({**progress, "done": [0, 1, 2, 3, 4]}))
    calls.clear()
    monkeypatch.setattr(stream_mod.StoredKeys, "range", lambda self, a, b: calls.append(a) or real(self, a, b))
    manifest = build_index(IndexConfig(run_dir=tmp_path / "killed", on_disk=True, **CONFIG))
    assert calls == ([0] if damage == "shard_changed" else []) + [1000, 1500, 2000]  # intact chunks not redone
    assert manifest.ntotal == len(keys) and not partial.exists()
    lists = [(tmp_path / r / "index" / LISTS_FILE).read_bytes() for r in ("whole", "killed")]
    assert lists[0] == lists[1]
    assert RunDir(tmp_path / "killed").require("index").fingerprint == manifest.fingerprint


def test_codes_added_without_encoding_equal_encoded_entries():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    trained = faiss.index_factory(16, "IVF300,PQ4")  # 300 lists: two-byte list numbers
    trained.train(x)  # (faiss warns about few points per list: fine here)
    encoded = faiss.clone_index(trained)
    encoded.add_with_ids(x[:500], np.arange(100, 600))
    ivf = faiss.extract_index_ivf(trained)
    lists = ivf.quantizer.assign(x[:500], 1).ravel().astype(np.int64)
    codes = trained.sa_encode(x[:500])[:, ivf.coarse_code_size() :]  # [n, code_size] without the list number
    direct = faiss.clone_index(trained)
    add_codes(direct, lists, codes, np.arange(100, 600))
    assert direct.ntotal == 500 and ivf.coarse_code_size() == 2
    for index in (encoded, direct):
        faiss.extract_index_ivf(index).nprobe = 300
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    np.testing.assert_array_equal(direct.search(queries, 8)[1], encoded.search(queries, 8)[1])
