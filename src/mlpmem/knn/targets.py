"""kNN targets: for every datastore entry, the sparse p_kNN of its own key's neighbours (itself excluded).

    mlpmem targets --run-dir RUN [--k 64] [--knn-temperature 10] [--width 128]

Each entry's key is searched with k + 1 neighbours; the entry itself is dropped *by id* (when the search did
not return it, e.g. under PQ with duplicate keys, the farthest neighbour is dropped instead), so exactly k
remain. Stored memmaps: ``tokens`` int32 [N, w] (padding -1), ``probs`` float32 [N, w] (padding 0; rows sum
to 1), ``gold`` int32 [N] (the entry's own value), with w = min(width, k). Chunks of ``chunk_size`` queries
are written and flushed before being marked done; a resumed run gives byte-identical files because FAISS
results are deterministic for a given index and query batch, and batches are aligned to chunks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from mlpmem.artifacts import Stage, open_array, require_stage
from mlpmem.config import TargetsConfig
from mlpmem.errors import UsageError
from mlpmem.knn.distribution import neighbour_values, sparse_distribution
from mlpmem.knn.index import load_index, set_nprobe
from mlpmem.knn.search import search

SEARCH_BATCH = 4096  # queries per FAISS call; fixed so that results do not depend on the chunk size


def drop_self(sq_dists: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove each row's own id from k + 1 neighbours (else its last neighbour): dists, ids [Q, k] and a
    [Q] bool telling whether the row's own id was found."""
    q, k1 = ids.shape
    hit = ids == self_ids[:, None]  # [Q, k+1]
    found = hit.any(axis=1)
    drop = np.where(found, hit.argmax(axis=1), k1 - 1)
    keep = np.ones_like(hit)
    keep[np.arange(q), drop] = False
    return sq_dists[keep].reshape(q, k1 - 1), ids[keep].reshape(q, k1 - 1), found


def build_targets(config: TargetsConfig) -> dict[str, Any]:
    """Compute the sparse kNN distribution of every datastore entry; returns the targets manifest."""
    run_dir = Path(config.run_dir)
    datastore = require_stage(run_dir, "datastore", f"mlpmem datastore --run-dir {run_dir}")
    index, index_manifest = load_index(run_dir, datastore, use_gpu="auto")
    keys = open_array(run_dir, "datastore", "keys")  # [N, d]
    values = open_array(run_dir, "datastore", "values")  # [N]
    n = len(values)
    if config.k >= index.ntotal:
        raise UsageError(f"--k ({config.k}) must be smaller than the datastore ({index.ntotal} entries; each entry's own key is excluded)")
    nprobe = config.nprobe or index_manifest.get("nprobe")
    width = min(config.width, config.k)
    n_chunks = -(-n // config.chunk_size)

    stage = Stage(run_dir, "targets")
    inputs = {"datastore": datastore["fingerprint"], "index": index_manifest["fingerprint"]}
    if stage.begin(config.model_dump(mode="json", exclude={"run_dir"}), inputs) == "complete":
        return stage.manifest
    tokens = stage.add_array("tokens", "int32", (n, width))
    probs = stage.add_array("probs", "float32", (n, width))
    gold = stage.add_array("gold", "int32", (n,))
    self_found = stage.add_array("self_found", "int64", (n_chunks,))  # per chunk: entries whose own id came back
    set_nprobe(index, nprobe)

    done = stage.done_chunks()
    todo = [c for c in range(n_chunks) if c not in done]
    size = lambda c: min(n, (c + 1) * config.chunk_size) - c * config.chunk_size  # noqa: E731
    bar = tqdm(total=n, initial=sum(size(c) for c in done), unit="q", unit_scale=True, desc="targets")
    t0, computed = time.time(), 0
    for c in todo:
        a, b = c * config.chunk_size, min(n, (c + 1) * config.chunk_size)
        dists, ids = search(index, keys[a:b], config.k + 1, batch=SEARCH_BATCH)  # [q, k+1]
        dists, ids, found = drop_self(dists, ids, np.arange(a, b))
        tok, prob = sparse_distribution(dists, neighbour_values(values, ids), config.knn_temperature, width)
        tokens[a:b], probs[a:b], gold[a:b] = tok, prob, values[a:b]
        self_found[c] = int(found.sum())
        for array in (tokens, probs, gold, self_found):
            array.flush()
        stage.mark_chunk(c, done)
        computed += b - a
        bar.update(b - a)
    bar.close()
    seconds = time.time() - t0
    found_total = int(np.asarray(self_found).sum())
    stage.manifest["timings"].update(search_seconds=round(seconds, 2), queries_per_second=round(computed / max(seconds, 1e-9), 1))
    return stage.complete(
        {"entries": n, "self_found": found_total, "self_missing": n - found_total},
        k=config.k,
        width=width,
        knn_temperature=config.knn_temperature,
        nprobe=nprobe,
        entries=n,
        faiss_threads=faiss.omp_get_max_threads(),
        datastore_fingerprint=datastore["fingerprint"],
        index_fingerprint=index_manifest["fingerprint"],
    )
