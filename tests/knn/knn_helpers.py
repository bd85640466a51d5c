"""Helpers for kNN tests: small synthetic datastores written as complete 'datastore' stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.artifacts import Stage


def write_datastore(run_dir: Path, keys: np.ndarray, values: np.ndarray, tag: str = "synthetic") -> dict:
    """A complete datastore stage holding ``keys`` [N, d] and ``values`` [N] (as build_datastore lays it out)."""
    stage = Stage(run_dir, "datastore")
    stage.begin({"synthetic": tag, "n": len(values)}, {})
    k = stage.add_array("keys", str(keys.dtype), keys.shape)
    k[:] = keys
    k.flush()
    v = stage.add_array("values", "int32", values.shape)
    v[:] = values
    v.flush()
    return stage.complete({"entries": len(values)}, key_dim=int(keys.shape[1]), key_layer="synthetic", entries=len(values))


def random_datastore(n: int = 300, d: int = 8, vocab: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32) * 3
    values = rng.integers(0, vocab, n).astype(np.int32)
    return keys, values
