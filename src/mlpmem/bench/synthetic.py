"""Synthetic kNN-LM stores for timing: IVF-PQ indexes over random keys of the real key width, at any size.

Search cost depends on the index geometry (nlist, code size, entries per list, nprobe, k), not on what the keys
mean, so a random store of N entries times retrieval as a real one of N entries would. To build 50M entries on
a laptop-class CPU the usual k-means and assignment steps are skipped: the nlist coarse centroids are random
Gaussian points, each key is a centroid plus unit noise, and keys are added with their known list
(``IndexIVF.add_core`` with precomputed assignments); the PQ codebooks are trained on a sample of residuals as
usual. Keys are generated and encoded in chunks, never held all at once.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from mlpmem.systems import KNN_LM

CENTROID_SCALE = 4.0  # spread of the coarse centroids relative to the unit noise around them
PQ_TRAIN = 16_384  # residuals sampled to train the PQ codebooks


def ivfpq_geometry(n: int, d: int, k: int, nprobe: int) -> tuple[int, int]:
    """(nlist, m) for a store of ``n`` keys of width ``d``.

    nlist ≈ 4·sqrt(n) rounded to a power of two (the kNN-LM recipe's lists growing with the store), capped so the
    ``nprobe`` probed lists hold at least ``k`` entries on average; m = the code bytes ``mlpmem index`` picks.
    """
    nlist = 1 << int(round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    cap = 1 << max(0, int(math.floor(math.log2(max(1.0, nprobe * n / k)))))
    nlist = max(1, min(nlist, cap))
    m = next((m for m in KNN_LM.pq_choices if d % m == 0 and d // m >= 8), None)
    m = m or next((m for m in KNN_LM.pq_choices if d % m == 0 and d // m >= 2), None) or 1
    return nlist, m


def build_synthetic_index(
    n: int, d: int, k: int, nprobe: int, seed: int = 0, chunk: int = 262_144
) -> tuple[faiss.IndexIVFPQ, str]:
    """An IVF-PQ index of ``n`` random keys of width ``d`` (nprobe set) and its factory string."""
    nlist, m = ivfpq_geometry(n, d, k, nprobe)
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((nlist, d), dtype=np.float32) * CENTROID_SCALE  # [nlist, d]
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8)
    index.do_polysemous_training = False
    index.pq.cp.min_points_per_centroid = (
        8  # small stores train on fewer residuals than faiss asks for; fine for timing
    )
    n_train = min(PQ_TRAIN, max(n, 10 * 256))  # small stores: no more residuals than keys
    sample = centroids[rng.integers(nlist, size=n_train)] + rng.standard_normal((n_train, d), dtype=np.float32)
    index.train(sample)  # the quantizer already holds nlist centroids: only the PQ codebooks are trained
    for a in range(0, n, chunk):
        c = min(chunk, n - a)
        lists = rng.integers(nlist, size=c).astype(np.int64)  # [c]
        keys = centroids[lists] + rng.standard_normal((c, d), dtype=np.float32)  # [c, d]
        ids = np.arange(a, a + c, dtype=np.int64)
        index.add_core(c, faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    index.nprobe = min(nprobe, nlist)
    return index, f"IVF{nlist},PQ{m}"


def cached_synthetic_index(
    folder: Path, n: int, d: int, k: int, nprobe: int, seed: int = 0
) -> tuple[faiss.IndexIVFPQ, str, Path, bool]:
    """``build_synthetic_index`` through a file in ``folder``: read when an earlier build wrote it, else built and
    written (atomically). Returns (index, factory, its file, whether it was read)."""
    nlist, m = ivfpq_geometry(n, d, k, nprobe)
    path = folder / f"synthetic-{n}-d{d}-IVF{nlist},PQ{m}-seed{seed}.faiss"
    if path.is_file():
        index = faiss.read_index(str(path))
        index.nprobe = min(nprobe, nlist)
        return index, f"IVF{nlist},PQ{m}", path, True
    index, factory = build_synthetic_index(n, d, k, nprobe, seed)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    faiss.write_index(index, str(partial))
    partial.replace(path)
    return index, factory, path, False


def datastore_bytes(n: int, d: int) -> int:
    """Bytes of a datastore of ``n`` entries as ``mlpmem datastore`` stores it: keys fp16 [n, d] + values int32 [n]."""
    return n * (2 * d + 4)
