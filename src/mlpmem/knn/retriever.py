"""Live kNN-LM retrieval: a run's index and datastore values as one object giving p_kNN for any key.

    retriever, datastore = load_knn(RunDir("runs/demo"), model_fingerprint, k=256)
    log_p = retriever.log_probs(keys, vocab_size)                          # keys [Q, d] -> [Q, V] (generation)
    gold = retriever.gold_log_probs(keys, gold_ids, temperatures=[5, 10])  # [Q, n_T] (evaluation)

Evaluation, generation and the benchmark all retrieve through this class, so the search, the re-ranking and
the distribution are the same wherever kNN-LM is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlpmem.artifacts import RunDir
from mlpmem.data.tokens import prepared_vocab_size
from mlpmem.errors import UsageError
from mlpmem.manifests import DatastoreManifest

DEFAULT_KNN_TEMPERATURE = 10.0


@dataclass
class KnnRetriever:
    """Search ``index`` for each key and aggregate the neighbours' values into p_kNN.

    ``values`` [N] are the datastore's next tokens (int; RAM or memmap); ``k`` neighbours, ``nprobe`` IVF lists
    (None: the index's own), ``temperature`` T of softmax(-d/T) over squared L2 distances; ``stored_keys`` (the
    datastore's keys [N, d]) re-rank the neighbours with exact distances when given. With ``vocab_size`` (of the
    prepared tokens), every value read is checked to be a token id (UsageError naming the values' file).
    """

    index: Any
    values: np.ndarray
    k: int = 256
    temperature: float = DEFAULT_KNN_TEMPERATURE
    nprobe: int | None = None
    stored_keys: np.ndarray | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.k > int(self.index.ntotal):
            raise UsageError(
                f"k = {self.k} neighbours asked of a datastore of {int(self.index.ntotal):,} entries", field="k"
            )

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances float32 [Q, k] and neighbour ids int64 [Q, k] (-1: none) of queries [Q, d]."""
        from mlpmem.knn.search import rerank_exact, search

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        dists, ids = search(self.index, queries, self.k, self.nprobe)
        if self.stored_keys is not None:
            dists, ids = rerank_exact(queries, ids, self.stored_keys)
        return dists, ids

    def log_probs(self, keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """keys [Q, d] -> log p_kNN [Q, V] float32 on the keys' device."""
        from mlpmem.knn.distribution import knn_log_probs_dense, neighbour_values

        dists, ids = self.search(keys.detach().float().cpu().numpy())  # [Q, k] each
        limit = vocab_size if self.vocab_size is None else min(vocab_size, self.vocab_size)
        dense = knn_log_probs_dense(dists, neighbour_values(self.values, ids, limit), self.temperature, vocab_size)
        return dense.to(keys.device)

    def gold_log_probs(self, keys: np.ndarray, gold: np.ndarray, temperatures: list[float]) -> np.ndarray:
        """log p_kNN(gold) [Q, len(temperatures)] float32 for keys [Q, d]: one search, every T from its distances."""
        from mlpmem.knn.distribution import knn_log_prob_of, neighbour_values

        dists, ids = self.search(keys)
        values = neighbour_values(self.values, ids, self.vocab_size)
        out = np.empty((len(gold), len(temperatures)), dtype=np.float32)
        for t, temperature in enumerate(temperatures):
            out[:, t] = np.asarray(knn_log_prob_of(dists, values, gold, temperature))
        return out


def check_datastore(datastore: DatastoreManifest, model_fingerprint: str, k: int) -> None:
    """UsageError (one line) when the datastore was built with another model, or holds fewer than ``k`` entries."""
    if datastore.model_fingerprint != model_fingerprint:
        raise UsageError(
            "the run's datastore was built with another model than the LM used here; "
            "rebuild it (mlpmem datastore) or leave kNN-LM out (--knn false)"
        )
    if k > datastore.entries:
        raise UsageError(f"k = {k} neighbours asked of a datastore of {datastore.entries:,} entries", field="k")


def load_knn(
    run: RunDir,
    model_fingerprint: str,
    k: int,
    nprobe: int | None = None,
    rerank: bool = False,
    temperature: float = DEFAULT_KNN_TEMPERATURE,
) -> tuple[KnnRetriever, DatastoreManifest]:
    """The run's index and datastore values (memory-mapped: one gather per step) as a retriever, and the datastore's
    manifest (its ``key_layer`` says which LM module the queries must come from).

    Refused with one line: a datastore built with another model than ``model_fingerprint``; ``k`` larger than the
    datastore.
    """
    from mlpmem.knn.index import load_index

    datastore = run.require("datastore")
    check_datastore(datastore, model_fingerprint, k)
    if rerank and "keys" not in datastore.arrays:
        raise UsageError("re-ranking needs stored keys; this datastore streams them (--keys streamed)", field="rerank")
    index, _ = load_index(run.path)
    values = run.array("datastore", "values", datastore)  # [N] int32 memmap (its file named if a value is wrong)
    stored_keys = run.array("datastore", "keys", datastore) if rerank else None
    vocab_size = prepared_vocab_size(run)
    retriever = KnnRetriever(index, values, k, temperature, nprobe, stored_keys, vocab_size)
    return retriever, datastore
