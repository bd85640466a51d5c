"""search(): batching does not change results; float16 memmap queries are accepted."""

from __future__ import annotations

import numpy as np
import pytest

from mlpmem.artifacts import RunDir
from mlpmem.config import IndexConfig
from mlpmem.knn.index import build_index, load_index
from mlpmem.knn.search import search

from knn_helpers import random_datastore, write_datastore

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def test_batches_and_float16_memmap_queries(tmp_path):
    keys, values = random_datastore(n=150, d=8)
    write_datastore(tmp_path, keys.astype(np.float16), values)
    build_index(IndexConfig(run_dir=tmp_path))
    index, _ = load_index(tmp_path)
    stored = RunDir(tmp_path).array("datastore", "keys")  # float16 memmap [150, 8]
    d_small, i_small = search(index, stored, k=5, batch=7)
    d_big, i_big = search(index, np.asarray(stored, dtype=np.float32), k=5)
    np.testing.assert_array_equal(i_small, i_big)
    np.testing.assert_array_equal(d_small, d_big)
    assert (i_small[:, 0] == np.arange(150)).all() and np.allclose(d_small[:, 0], 0, atol=1e-3)  # each key finds itself
