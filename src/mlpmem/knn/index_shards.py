"""Filling a trained FAISS index from several processes: each rank encodes its contiguous block of the keys into a
copy of the trained index, the main process merges the copies in rank order.

IVF lists keep their entries in insertion order, so blocks merged in rank order give the same lists, ids and
bytes as one process adding every key in order (tested). Indexes without inverted lists (``Flat``: adding is a
copy) are filled by the main process alone.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from mlpmem.distributed import contiguous_share

TRAINED = "trained.faiss.tmp"  # .tmp: removed with the other temp files if the stage is killed
SHARD = "shard.rank{rank}.faiss.tmp"


def add_in_chunks(index: faiss.Index, keys: np.ndarray, a: int, b: int, chunk: int, with_ids: bool) -> None:
    """Add keys[a:b] ([n, d] memmap) in float32 chunks (never a full float32 copy), with ids a.. when asked."""
    for s in range(a, b, chunk):
        e = min(s + chunk, b)
        x = np.ascontiguousarray(keys[s:e], dtype=np.float32)  # [c, d]
        if with_ids:
            index.add_with_ids(x, np.arange(s, e, dtype=np.int64))
        else:
            index.add(x)


def shardable(index: faiss.Index) -> bool:
    """Whether the index itself has inverted lists to merge (IVF-Flat, IVF-PQ...)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVF)


def add_sharded(index: faiss.Index | None, keys: np.ndarray, chunk: int, state, folder: Path) -> faiss.Index | None:
    """Fill the main process's trained CPU ``index`` (None on other ranks) with every key [N, d], each rank its
    block; returns the filled index on the main process, None elsewhere."""
    folder = Path(folder)
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        faiss.write_index(index, str(folder / TRAINED))
    state.wait_for_everyone()
    if not state.is_main_process:
        index = faiss.read_index(str(folder / TRAINED))
    a, b = contiguous_share(keys.shape[0], rank, world)
    add_in_chunks(index, keys, a, b, chunk, with_ids=True)
    if not state.is_main_process:
        faiss.write_index(index, str(folder / SHARD.format(rank=rank)))
        index = None
    state.wait_for_everyone()
    if state.is_main_process:
        ivf = faiss.extract_index_ivf(index)
        for r in range(1, world):
            path = folder / SHARD.format(rank=r)
            shard = faiss.read_index(str(path))  # kept referenced while merging (FAISS holds a raw pointer)
            ivf.merge_from(faiss.extract_index_ivf(shard), 0)
            del shard
            path.unlink()
        (folder / TRAINED).unlink()
    return index
