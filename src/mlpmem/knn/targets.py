"""kNN targets: for every datastore entry, the sparse p_kNN of its own key's neighbours (itself excluded).

    mlpmem targets --run-dir RUN [--k 64] [--knn-temperature 10] [--width 128]
    accelerate launch --multi_gpu --num_processes N -m mlpmem.cli targets --run-dir RUN   # chunks shared by rank

Each entry's key is searched with k + 1 neighbours; the entry itself is dropped *by id* (when the search did
not return it, e.g. under PQ with duplicate keys, the farthest neighbour is dropped instead), so exactly k
remain. Stored memmaps: ``tokens`` int32 [N, w] (padding -1), ``probs`` float32 [N, w] (padding 0; rows sum
to 1), ``gold`` int32 [N] (the entry's own value), with w = min(width, k). Chunks of ``chunk_size`` queries
are written and flushed before being marked done; a resumed run gives byte-identical files because FAISS
results are deterministic for a given index and query batch, and batches are aligned to chunks.
"""

from __future__ import annotations

import faiss
import numpy as np

from mlpmem.artifacts import RunDir
from mlpmem.config import TargetsConfig
from mlpmem.distributed import begin_shared, clear_rank_progress, process_state, run_chunks
from mlpmem.errors import UsageError
from mlpmem.knn.distribution import neighbour_values, sparse_distribution
from mlpmem.knn.index import load_index, set_nprobe
from mlpmem.knn.search import search
from mlpmem.manifests import TargetsManifest

SEARCH_BATCH = 4096  # queries per FAISS call; fixed so that results do not depend on the chunk size
TARGET_ARRAYS = ("tokens", "probs", "gold", "self_found")


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


def build_targets(config: TargetsConfig) -> TargetsManifest:
    """Compute the sparse kNN distribution of every datastore entry; returns the targets manifest."""
    run = RunDir(config.run_dir)
    datastore, index_manifest = run.require("datastore"), run.require("index")
    inputs = {"datastore": datastore.fingerprint, "index": index_manifest.fingerprint}
    if (done := run.reusable("targets", config, inputs)) is not None:
        return done
    n = datastore.entries
    if config.k >= n:
        raise UsageError(
            f"k ({config.k}) must be smaller than the datastore ({n} entries; each entry's own key is excluded)",
            field="k",
        )
    state, _ = process_state("auto")
    index, _ = load_index(run.path, use_gpu="auto")
    keys, values = run.array("datastore", "keys", datastore), run.array("datastore", "values", datastore)  # [N, d], [N]
    nprobe = config.nprobe or index_manifest.nprobe
    width = min(config.width, config.k)
    n_chunks = -(-n // config.chunk_size)

    def allocate(build) -> None:
        build.add_array("tokens", "int32", (n, width))
        build.add_array("probs", "float32", (n, width))
        build.add_array("gold", "int32", (n,))
        build.add_array("self_found", "int64", (n_chunks,))  # per chunk: entries whose own id came back

    build = begin_shared(run, "targets", config, inputs, state, allocate)
    tokens, probs, gold, self_found = (build.manifest.arrays[a].open(build.dir, "r+") for a in TARGET_ARRAYS)
    set_nprobe(index, nprobe)

    def work(c: int) -> int:
        a, b = c * config.chunk_size, min(n, (c + 1) * config.chunk_size)
        dists, ids = search(index, keys[a:b], config.k + 1, batch=SEARCH_BATCH)  # [q, k+1]
        dists, ids, found = drop_self(dists, ids, np.arange(a, b))
        tok, prob = sparse_distribution(dists, neighbour_values(values, ids), config.knn_temperature, width)
        tokens[a:b], probs[a:b], gold[a:b] = tok, prob, values[a:b]
        self_found[c] = int(found.sum())
        for array in (tokens, probs, gold, self_found):
            array.flush()
        return b - a

    size = lambda c: min(n, (c + 1) * config.chunk_size) - c * config.chunk_size  # noqa: E731
    seconds, computed = run_chunks(build, state, n_chunks, size, work, "targets", "q")
    if state.is_main_process:
        finish(build, seconds, computed, nprobe)
    state.wait_for_everyone()
    return run.require("targets")


def finish(build, seconds: float, computed: int, nprobe: int | None) -> None:
    """The main process records timings and the entries whose own id came back, and completes the stage."""
    clear_rank_progress(build)
    self_found = build.manifest.arrays["self_found"].open(build.dir)  # [n_chunks]: every rank's chunks
    build.manifest.timings = {
        **build.manifest.timings,
        "search_seconds": round(seconds, 2),
        "queries_per_second": round(computed / max(seconds, 1e-9), 1),
    }
    build.complete(
        nprobe=nprobe, self_found=int(np.asarray(self_found).sum()), faiss_threads=faiss.omp_get_max_threads()
    )
