"""Helpers for kNN tests: small synthetic datastores written as complete 'datastore' stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.artifacts import RunDir
from mlpmem.config import DatastoreConfig
from mlpmem.manifests import DatastoreManifest


def write_datastore(run_dir: Path, keys: np.ndarray, values: np.ndarray, tag: str = "synthetic") -> DatastoreManifest:
    """A complete datastore stage holding ``keys`` [N, d] and ``values`` [N] (as build_datastore lays it out),
    written through the stage API with synthetic content."""
    config = DatastoreConfig(key_layer=f"synthetic-{tag}-{len(values)}", key_dtype=str(keys.dtype))
    build = RunDir(run_dir).begin("datastore", config, {})
    k = build.add_array("keys", str(keys.dtype), keys.shape)
    k[:] = keys
    k.flush()
    v = build.add_array("values", "int32", values.shape)
    v[:] = values
    v.flush()
    return build.complete(model_fingerprint="synthetic", key_layer=config.key_layer)


def random_datastore(n: int = 300, d: int = 8, vocab: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32) * 3
    values = rng.integers(0, vocab, n).astype(np.int32)
    return keys, values
