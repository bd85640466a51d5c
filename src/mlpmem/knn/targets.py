"""kNN targets: for every datastore entry, the sparse p_kNN of its own key's neighbours (itself excluded).

    mlpmem targets --run-dir RUN [--k 64] [--knn-temperature 10] [--width 128]

Each entry's key is searched with k + 1 neighbours; the entry itself is dropped *by id* (when the search did
not return it, e.g. under PQ with duplicate keys, the farthest neighbour is dropped instead), so exactly k
remain. Stored memmaps: ``tokens`` int32 [N, w] (padding -1), ``probs`` float32 [N, w] (padding 0; rows sum
to 1), ``gold`` int32 [N] (the entry's own value), with w = min(width, k). Chunks of ``chunk_size`` queries
are written and flushed before being marked done (a streamed datastore's keys are recomputed by the LM as the
queries; distances are then the index's PQ distances); a resumed run gives byte-identical files because FAISS
results are deterministic for a given index and query batch, and batches are aligned to chunks.
``--store false`` (disk-light) writes nothing: train-memory searches the targets of each batch as it trains
(``SearchedTargets``: the same rows, from the batch's keys).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from mlpmem.artifacts import RunDir
from mlpmem.config import TargetsConfig
from mlpmem.data.tokens import check_token_ids, prepared_vocab_size, source_of
from mlpmem.distributed import begin_shared, clear_rank_progress, process_state, run_chunks
from mlpmem.errors import UsageError
from mlpmem.knn.distribution import neighbour_values, sparse_distribution
from mlpmem.knn.index import load_index, set_nprobe
from mlpmem.knn.search import search
from mlpmem.knn.stream import key_source
from mlpmem.manifests import TargetsManifest

TARGET_ARRAYS = ("tokens", "probs", "gold", "self_found")
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


def knn_rows(
    index: faiss.Index,
    values: np.ndarray,
    queries: np.ndarray,
    self_ids: np.ndarray,
    config: TargetsConfig,
    vocab_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse p_kNN of entries ``self_ids`` [q] from their keys ``queries`` [q, d]: tokens [q, w] int32, probs
    [q, w] float32 and whether each entry's own id came back [q] (the index's nprobe is used as set). The
    neighbours' values are checked against ``vocab_size`` when given."""
    dists, ids = search(index, queries, config.k + 1, batch=SEARCH_BATCH)  # [q, k+1]
    dists, ids, found = drop_self(dists, ids, self_ids)
    width = min(config.width, config.k)
    neighbours = neighbour_values(values, ids, vocab_size)  # [q, k]
    tok, prob = sparse_distribution(dists, neighbours, config.knn_temperature, width)
    return tok, prob, found


class SearchedTargets:
    """The rows ``build_targets`` would store, searched when a training batch asks (``targets --store false``)."""

    def __init__(self, run_dir: Path, manifest: TargetsManifest):
        run = RunDir(run_dir)
        self.index, _ = load_index(run.path)
        set_nprobe(self.index, manifest.nprobe)
        self.values = run.array("datastore", "values")  # [N] int32 memmap
        self.vocab_size = prepared_vocab_size(run)  # every value read is checked against it
        self.config = manifest.config

    def rows(
        self, ids: np.ndarray, device: torch.device, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target tokens [n, w], probs [n, w] and gold [n] of entries ``ids`` [n] whose keys are ``keys`` [n, d]."""
        queries = keys.detach().float().cpu().numpy()
        tok, prob, _ = knn_rows(self.index, self.values, queries, ids, self.config, self.vocab_size)
        gold = neighbour_values(self.values, ids, self.vocab_size)  # [n]
        return tuple(torch.from_numpy(np.asarray(a)).to(device) for a in (tok.astype(np.int64), prob, gold))


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
    index, _ = load_index(run.path, use_gpu="auto" if config.store else "no")
    keys = key_source(run.path, datastore, config.device, config.batch_size)  # stored, or recomputed by the LM
    values = run.array("datastore", "values", datastore)  # [N]
    vocab_size = prepared_vocab_size(run)  # the values of each chunk and of its neighbours are checked
    nprobe = config.nprobe or index_manifest.nprobe
    width = min(config.width, config.k)
    n_chunks = -(-n // config.chunk_size)

    if not config.store:  # disk-light: train-memory searches each batch's targets (SearchedTargets)
        build = begin_shared(run, "targets", config, inputs, state)
        if state.is_main_process:
            build.complete(nprobe=nprobe, faiss_threads=faiss.omp_get_max_threads())
        state.wait_for_everyone()
        return run.require("targets")

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
        tok, prob, found = knn_rows(index, values, keys.range(a, b), np.arange(a, b), config, vocab_size)
        check_token_ids(values[a:b], vocab_size, source_of(values))
        tokens[a:b], probs[a:b], gold[a:b] = tok, prob, values[a:b]
        self_found[c] = int(found.sum())
        for array in (tokens, probs, gold, self_found):
            array.flush()
        return b - a

    size = lambda c: min(n, (c + 1) * config.chunk_size) - c * config.chunk_size  # noqa: E731

    def rows(c: int) -> tuple[np.ndarray, ...]:
        a, b = c * config.chunk_size, min(n, (c + 1) * config.chunk_size)
        return tokens[a:b], probs[a:b], gold[a:b], self_found[c : c + 1]

    seconds, computed = run_chunks(build, state, n_chunks, size, work, "targets", "q", rows)
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
