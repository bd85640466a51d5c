"""Retrievers of references, one interface for training, evaluation and generation.

    retriever = load_retriever(run)                       # the one the references stage built (bm25 or dense)
    refs = retrieve(retriever, queries, k=5, exclude=...)  # [Q, k] int64 reference ids, -1 where none

A query is the ``query_tokens`` (64) tokens *before* the tokens about to be predicted (``queries_before``): no
token ever retrieves with its own future. The first chunk of a text has nothing before it and retrieves nothing.

BM25 (default, the ``bm25s`` library) indexes token ids as terms: the references and the queries are already
token ids of the run's tokenizer, so no second tokenizer is needed, nothing is downloaded, and the retriever sees
exactly the text the LM sees (a word tokenizer would split text the BPE does not, and map decoded sub-words to
words that are not in the text). Dense: FAISS inner product over the LM's own mean-pooled final hidden states,
L2-normalised (cosine).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mlpmem.errors import UsageError

BM25_DIR = "bm25"


class Retriever(Protocol):
    def search(self, queries: Sequence[np.ndarray], k: int) -> np.ndarray:
        """Reference ids [Q, k] int64, best first; -1 where a query (e.g. an empty one) finds none."""


def queries_before(tokens: np.ndarray, starts: Sequence[int], query_tokens: int) -> list[np.ndarray]:
    """The query of each predicted span beginning at ``starts``: the ``query_tokens`` tokens before it."""
    return [np.asarray(tokens[max(0, s - query_tokens) : s], dtype=np.int64) for s in starts]


def retrieve(
    retriever: Retriever, queries: Sequence[np.ndarray], k: int, exclude: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """Top-``k`` reference ids [Q, k] (-1 padded), leaving out ``exclude[q]`` for query q."""
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    found = retriever.search(queries, k + extra)
    if not extra:
        return found[:, :k]
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for q, (row, drop) in enumerate(zip(found, exclude)):
        kept = row[(row >= 0) & ~np.isin(row, drop)][:k]
        out[q, : len(kept)] = kept
    return out


def overlapping(source_start: np.ndarray, lengths: np.ndarray, begin: int, end: int, share: float = 0.9) -> np.ndarray:
    """Ids of the references (cut from the same token stream, in order) covering more than ``share`` of the span
    [begin, end): Memory3 excludes them from a training chunk's retrieval (they hold the chunk's own text)."""
    first = max(0, int(np.searchsorted(source_start, begin, side="right")) - 1)
    last = int(np.searchsorted(source_start, end, side="left"))
    cand = np.arange(first, last)
    covered = np.minimum(source_start[cand] + lengths[cand], end) - np.maximum(source_start[cand], begin)
    return cand[covered > share * (end - begin)]


def check_index_arrays(scores: dict) -> None:
    """ValueError unless bm25s' sparse arrays are 1-D numbers whose ``indptr`` (per term) ascends from 0 to the
    entry count and whose reference ids lie in [0, num_docs)."""
    data, indices, indptr, n_docs = (scores[k] for k in ("data", "indices", "indptr", "num_docs"))
    kinds = (data.dtype.kind in "f", indices.dtype.kind in "iu", indptr.dtype.kind in "iu")
    if not all(kinds) or any(a.ndim != 1 for a in (data, indices, indptr)) or not len(indptr):
        raise ValueError("its arrays are not 1-D arrays of scores and ids")
    if indptr[0] != 0 or indptr[-1] != len(indices) or len(data) != len(indices) or np.any(np.diff(indptr) < 0):
        raise ValueError("its term pointers do not cover its entries")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= int(n_docs)):
        raise ValueError(f"a reference id lies outside [0, {n_docs})")


class BM25Retriever:
    """BM25 over references whose terms are token ids (``bm25s``)."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def build(cls, references: Sequence[np.ndarray], folder: Path) -> BM25Retriever:
        import bm25s
        from bm25s.tokenization import Tokenized

        docs = [list(map(int, r)) for r in references]
        top = max(max(d) for d in docs) + 1
        model = bm25s.BM25()
        model.index(Tokenized(ids=docs, vocab={str(t): t for t in range(top)}), show_progress=False)
        model.save(str(folder))
        return cls(model)

    @classmethod
    def load(cls, folder: Path) -> BM25Retriever:
        """The index saved in ``folder``, its arrays never unpickled; UsageError (one line) when it cannot be read
        or its arrays do not form a term-by-reference index."""
        import bm25s

        try:
            model = bm25s.BM25.load(str(folder), allow_pickle=False)
            check_index_arrays(model.scores)
        except (OSError, ValueError, TypeError, KeyError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(
                f"{folder} is not a readable BM25 index ({reason}); remove {Path(folder).parent} and rerun "
                "`mlpmem references`"
            ) from None
        return cls(model)

    def search(self, queries: Sequence[np.ndarray], k: int) -> np.ndarray:
        from bm25s.tokenization import Tokenized

        n_docs = int(self.model.scores["num_docs"])
        known = len(self.model.vocab_dict)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        rows = [i for i, q in enumerate(queries) if len(q)]
        if not rows:
            return out
        terms = [[int(t) for t in queries[i] if t < known] or [0] for i in rows]
        vocab = {str(t): t for t in range(known)}
        found, _ = self.model.retrieve(
            Tokenized(ids=terms, vocab=vocab), k=min(k, n_docs), show_progress=False, n_threads=1
        )
        out[rows, : found.shape[1]] = found
        return out


class DenseRetriever:
    """Cosine similarity (FAISS inner product) between the LM's mean-pooled final states of queries and references."""

    def __init__(self, embeddings: np.ndarray, lm, batch_size: int = 16):
        import faiss

        self.lm, self.batch_size = lm, batch_size
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    def search(self, queries: Sequence[np.ndarray], k: int) -> np.ndarray:
        out = np.full((len(queries), k), -1, dtype=np.int64)
        rows = [i for i, q in enumerate(queries) if len(q)]
        if rows:
            _, found = self.index.search(embed(self.lm, [queries[i] for i in rows], self.batch_size), k)
            out[rows] = found
        return out


def embed(lm, texts: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """L2-normalised mean of the LM's final hidden states over each token sequence: [n, d] float32."""
    import torch

    device = next(lm.parameters()).device
    out = np.empty((len(texts), lm.config.n_embd), dtype=np.float32)
    lengths = np.array([len(t) for t in texts])
    with torch.no_grad():
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            for i in range(0, len(rows), batch_size):
                batch = rows[i : i + batch_size]
                x = torch.from_numpy(np.stack([np.asarray(texts[j], dtype=np.int64) for j in batch])).to(device)
                h = lm.transformer(input_ids=x, use_cache=False).last_hidden_state.float().mean(1)  # [b, d]
                out[batch] = torch.nn.functional.normalize(h, dim=-1).cpu().numpy()
    return out
