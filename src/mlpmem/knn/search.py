"""Batched k-nearest-neighbour search over a FAISS index (squared L2), and optional exact re-ranking."""

from __future__ import annotations

import faiss
import numpy as np

from mlpmem.errors import UsageError
from mlpmem.knn.index import set_nprobe


def search(
    index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None, batch: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest stored keys of each query: squared distances float32 [Q, k] and ids int64 [Q, k].

    ``queries`` [Q, d] may be float16 or a memmap; it is converted to float32 one batch at a time. ``nprobe``
    (IVF indexes) is set on ``index`` before searching. Missing neighbours come back as id -1.
    """
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise UsageError(
            f"query width {queries.shape[-1]} does not match the index dimension {index.d} "
            "(another key layer or model?)"
        )
    if k > index.ntotal:
        raise UsageError(f"k ({k}) is larger than the datastore ({index.ntotal} entries)", field="k")
    if nprobe is not None:
        set_nprobe(index, nprobe)
    n = queries.shape[0]
    dists = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for a in range(0, n, batch):
        b = min(a + batch, n)
        dists[a:b], ids[a:b] = index.search(np.ascontiguousarray(queries[a:b], dtype=np.float32), k)
    return dists, ids


def rerank_exact(
    queries: np.ndarray, ids: np.ndarray, keys: np.ndarray, max_floats: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared L2 [Q, k] float32 from the stored ``keys`` [N, d] for neighbour ``ids`` [Q, k], each row
    sorted by distance; ids -1 stay last with +inf. Works ``max_floats`` gathered key values at a time."""
    n, k = ids.shape
    d = keys.shape[1]
    dists = np.empty((n, k), dtype=np.float32)
    out_ids = np.empty_like(ids)
    rows = max(1, max_floats // max(1, k * d))
    for a in range(0, n, rows):
        b = min(a + rows, n)
        chunk = ids[a:b]  # [R, k]
        found = chunk >= 0
        q = np.asarray(queries[a:b], dtype=np.float32)  # [R, d]
        flat = chunk[found]
        order = np.argsort(flat, kind="stable")  # read the memmap in ascending id order
        gathered = np.empty((flat.size, d), dtype=np.float32)
        gathered[order] = keys[flat[order]]
        neigh = np.zeros((b - a, k, d), dtype=np.float32)  # [R, k, d]
        neigh[found] = gathered
        diff = neigh - q[:, None, :]
        dist = np.einsum("rkd,rkd->rk", diff, diff)  # [R, k]
        dist[~found] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")
        dists[a:b] = np.take_along_axis(dist, order, axis=1)
        out_ids[a:b] = np.take_along_axis(chunk, order, axis=1)
    return dists, out_ids
