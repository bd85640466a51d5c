"""Which memories a window of text reads: one protocol for training, evaluation and generation.

A text is read in chunks of ``chunk`` (64) tokens. Chunk c's retrieval queries with the ``query_tokens`` tokens
before it (``mlpmem.explicit.retriever.queries_before``), so no token retrieves with its own future.

- training (``training_memory``): chunk c retrieves one reference; its tokens read the references of chunks
  c - memory_chunks + 1 .. c (its own and the four before, Memory3's continual training);
- reading (``reading_memory``, evaluation and generation): chunk c retrieves ``k`` (5) references and its tokens
  read those.

    store = MemoryStore.open(run)
    memory = reading_memory(store, tokens, begin=w.begin, length=L, k=5, chunk=64)   # ExplicitMemory for the window
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlpmem.artifacts import RunDir
from mlpmem.explicit.model import ExplicitMemory
from mlpmem.explicit.retriever import BM25_DIR, BM25Retriever, DenseRetriever, Retriever, queries_before, retrieve
from mlpmem.manifests import ExplicitMemoriesManifest, ReferencesManifest


@dataclass
class MemoryStore:
    """The run's references, their retriever and their memories [n_refs, layers, 2, heads, keep, head_dim]."""

    memories: np.ndarray
    retriever: Retriever
    source_start: np.ndarray  # [n_refs] first token of each reference in the stream it was cut from
    lengths: np.ndarray  # [n_refs]
    source: str  # "split:train" or a corpus
    query_tokens: int

    @classmethod
    def open(cls, run: RunDir, lm=None) -> MemoryStore:
        """The run's store; ``lm`` embeds the queries of a dense retriever (the warm-up LM that embedded the refs)."""
        refs, mem = run.require(ReferencesManifest), run.require(ExplicitMemoriesManifest)
        offsets = np.asarray(run.array("references", "offsets", refs))
        if refs.config.retriever == "bm25":
            retriever: Retriever = BM25Retriever.load(run.file("references", BM25_DIR))
        else:
            from mlpmem.lm.load import load_lm, run_lm_dir

            emb = np.asarray(run.array("references", "embeddings", refs), dtype=np.float32)
            retriever = DenseRetriever(emb, lm if lm is not None else load_lm(run_lm_dir(run.path)))
        return cls(
            memories=run.array("explicit-memories", "memories", mem),
            retriever=retriever,
            source_start=np.asarray(run.array("references", "source_start", refs)),
            lengths=np.diff(offsets),
            source=refs.source or "",
            query_tokens=refs.config.query_tokens,
        )

    def kv(self, refs: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """Memories of reference ids ``refs`` [B, R] (-1: a zero slot) as float32 [B, R, layers, 2, H, keep, d]."""
        picked = self.memories[np.maximum(refs, 0).reshape(-1)].astype(np.float32)
        picked[refs.reshape(-1) < 0] = 0
        return torch.from_numpy(picked.reshape(*refs.shape, *self.memories.shape[1:])).to(device)

    def search(self, tokens: np.ndarray, starts: list[int], k: int, exclude=None) -> np.ndarray:
        """[len(starts), k] references of the chunks beginning at ``starts`` of ``tokens`` (-1: none)."""
        return retrieve(self.retriever, queries_before(tokens, starts, self.query_tokens), k, exclude)


def training_memory(
    store: MemoryStore, chunk_refs: np.ndarray, first_chunks: np.ndarray, n_chunks: int, chunk: int, memory_chunks: int
) -> ExplicitMemory:
    """Memories of training windows whose first token starts chunk ``first_chunks[b]`` (of the split's chunks, with
    ``chunk_refs`` [n_split_chunks] their retrieved references): slot s holds the reference of chunk
    first - memory_chunks + 1 + s, read by the window's chunks s - memory_chunks + 1 .. s."""
    slots = n_chunks + memory_chunks - 1
    chunks = first_chunks[:, None] - memory_chunks + 1 + np.arange(slots)[None]  # [B, S] split chunk of each slot
    refs = np.where(chunks >= 0, chunk_refs[np.maximum(chunks, 0)], -1)
    rel = chunks - first_chunks[:, None]  # [B, S] the slot's chunk relative to the window's first chunk
    start = np.clip(rel, 0, n_chunks) * chunk
    end = np.clip(rel + memory_chunks, 0, n_chunks) * chunk
    end = np.where(refs >= 0, end, start)  # nothing retrieved: an empty interval
    return ExplicitMemory(store.kv(refs), torch.from_numpy(start), torch.from_numpy(end))


def reading_memory(
    store: MemoryStore, tokens: np.ndarray, begin: int, length: int, k: int, chunk: int
) -> ExplicitMemory:
    """Memories of one window ``tokens[begin:begin + length]``: each of its chunks reads the ``k`` references its
    query retrieved (a batch of 1)."""
    starts = list(range(begin, begin + length, chunk))
    refs = store.search(tokens, starts, k)  # [C, k]
    start = np.repeat(np.arange(len(starts)) * chunk, k)
    end = np.minimum(start + chunk, length)
    end = np.where(refs.reshape(-1) >= 0, end, start)
    return ExplicitMemory(store.kv(refs.reshape(1, -1)), torch.from_numpy(start[None]), torch.from_numpy(end[None]))
