"""Filling a trained FAISS index from several processes: each rank encodes its contiguous block of the key chunks
(read from the stored keys, or recomputed by the LM when they are streamed) into a copy of the trained index, the
main process merges the copies in rank order.

IVF lists keep their entries in insertion order, so blocks merged in rank order give the same lists, ids and
bytes as one process adding every chunk in order (tested). Indexes without inverted lists (``Flat``: adding is a
copy) are filled by the main process alone.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from mlpmem.distributed import contiguous_share
from mlpmem.progress import progress

TRAINED = "trained.faiss.tmp"  # .tmp: removed with the other temp files if the stage is killed
SHARD = "shard.rank{rank}.faiss.tmp"


def shardable(index: faiss.Index) -> bool:
    """Whether the index itself has inverted lists to merge (IVF-Flat, IVF-PQ...)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVF)


def add_sharded(index: faiss.Index | None, source, chunk: int, state, folder: Path) -> faiss.Index | None:
    """Fill the main process's trained CPU ``index`` (None on other ranks) with every key of ``source`` (stored or
    streamed keys, ``mlpmem.knn.stream``), each rank a contiguous block of its chunks of about ``chunk`` entries;
    returns the filled index on the main process, None elsewhere."""
    folder = Path(folder)
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        faiss.write_index(index, str(folder / TRAINED))
    state.wait_for_everyone()
    if not state.is_main_process:
        index = faiss.read_index(str(folder / TRAINED))
    ranges = source.ranges(chunk)
    first, last = contiguous_share(len(ranges), rank, world)
    mine = ranges[first:last]
    bar = progress(
        total=sum(b - a for a, b in mine), unit="key", unit_scale=True, desc=f"index (share {rank + 1}/{world})"
    )
    for a, b in mine:
        index.add_with_ids(source.range(a, b), np.arange(a, b, dtype=np.int64))
        bar.update(b - a)
    bar.close()
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
