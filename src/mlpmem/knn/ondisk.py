"""IVF indexes whose inverted lists live on disk (FAISS ``OnDiskInvertedLists``): RAM does not grow with the store.

    mlpmem index --run-dir RUN --on-disk        # or benchmarks/ondisk_bench.py for a synthetic 100M-entry store

Building: the trained, empty index is written once (``trained.faiss``); each chunk of entries is added to a fresh
copy of it, whose lists alone (``write_InvertedLists``) are written as a shard (``shards/NNNNNN.lists``) and
recorded as done, so a killed build resumes at chunk granularity and holds one chunk in RAM. ``merge`` then copies
every shard's lists, in chunk order, into one file of contiguous lists (``lists.bin``, exact sizes) and writes the
index header (``index.faiss``) that refers to it; the shards are deleted afterwards. Entries keep their global ids
(``add_with_ids``), and each list holds its entries in the order an in-memory index would, so search gives the
same ids and distances.
Peak disk: twice the lists, during the merge. Searching maps ``lists.bin`` (``IO_FLAG_ONDISK_SAME_DIR``: the
folder may be moved); only the probed lists are read, and their pages are cache the kernel may drop.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from mlpmem.artifacts import PROGRESS, disk_errors, file_sha256, read_progress, write_progress
from mlpmem.errors import UsageError

log = logging.getLogger(__name__)

TRAINED_FILE = "trained.faiss"
LISTS_FILE = "lists.bin"
SHARDS = "shards"


def write_index_atomically(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index`` through a temp file and rename (readers never see a partial index)."""
    tmp = path.parent / f".{path.name}.tmp"
    with disk_errors(path):
        try:
            faiss.write_index(index, str(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)


def read_any_index(path: Path) -> faiss.Index:
    """An index file, its on-disk lists (if any) mapped from the file's own folder."""
    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def is_on_disk(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


class OnDiskBuild:
    """The chunked build of an on-disk IVF index in ``folder`` (a stage's partial folder, or any folder)."""

    def __init__(self, folder: Path, trained: faiss.Index | None = None):
        """``trained``: the trained, empty index; None (or ignored) when a build in ``folder`` is resumed."""
        self.folder = Path(folder)
        self.shards = self.folder / SHARDS
        self.shards.mkdir(parents=True, exist_ok=True)
        if not (self.folder / TRAINED_FILE).is_file():
            if trained is None or faiss.try_extract_index_ivf(trained) is None:
                raise ValueError("on-disk inverted lists need a trained IVF index (a factory starting with 'IVF')")
            if not trained.is_trained or trained.ntotal != 0:
                raise ValueError("the on-disk build starts from a trained, empty index")
            write_index_atomically(trained, self.folder / TRAINED_FILE)
        try:  # a resumed build keeps its first training
            self.trained = faiss.read_index(str(self.folder / TRAINED_FILE))
        except RuntimeError:
            raise UsageError(
                f"{self.folder / TRAINED_FILE} is damaged (not a readable FAISS index); remove {self.folder} to "
                "start the build afresh"
            ) from None
        self._done: dict[int, str] | None = None
        drop_search_tables(self.trained)

    # chunks -------------------------------------------------------------------------------------------------
    def done(self) -> dict[int, str]:
        """The chunks whose shard is written (-> its sha256). Read once: a shard recorded done whose file is
        missing or no longer matches the hash recorded when it was written is built again."""
        if self._done is None:
            recorded = read_progress(self.shards / PROGRESS)
            self._done = {c: d for c, d in recorded.items() if self._intact(c, d)}
        return self._done

    def _intact(self, chunk: int, digest: str) -> bool:
        path = self.shard_path(chunk)
        if path.is_file() and not path.is_symlink() and file_sha256(path) == digest:
            return True
        log.warning("%s does not match the hash recorded when it was written: building it again", path)
        return False

    def shard_path(self, chunk: int) -> Path:
        return self.shards / f"{chunk:06d}.lists"

    def add_chunk(self, chunk: int, fill: Callable[[faiss.Index], None]) -> bool:
        """Run ``fill(empty trained copy)`` for a chunk not yet done and write its lists as a shard; False if done."""
        done = self.done()
        if chunk in done:
            return False
        shard = faiss.clone_index(self.trained)
        fill(shard)
        path = self.shard_path(chunk)
        tmp = path.parent / f".{path.name}.tmp"
        with disk_errors(path):  # the lists alone: the quantizer is the trained index's
            writer = faiss.FileIOWriter(str(tmp))
            faiss.write_InvertedLists(faiss.extract_index_ivf(shard).invlists, writer)
            del writer  # closes the file
        os.replace(tmp, path)
        done[chunk] = file_sha256(path)
        write_progress(self.shards / PROGRESS, done)
        return True

    # merging ------------------------------------------------------------------------------------------------
    def merge(self, index_path: Path, n_chunks: int) -> faiss.Index:
        """Merge the shards of chunks 0 .. n_chunks-1 into ``lists.bin`` + ``index_path``; returns the index."""
        missing = sorted(set(range(n_chunks)) - set(self.done()))
        if missing:
            raise ValueError(f"chunks {missing[:5]} are not built yet")
        index = faiss.clone_index(self.trained)
        ivf = faiss.extract_index_ivf(index)
        lists_path = self.folder / LISTS_FILE
        lists_path.unlink(missing_ok=True)  # a merge killed midway starts over
        shards = [  # mapped, not loaded: the shards together may exceed RAM
            faiss.read_InvertedLists(faiss.FileIOReader(str(self.shard_path(c))), faiss.IO_FLAG_MMAP)
            for c in range(n_chunks)
        ]
        with disk_errors(lists_path):
            invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
            pointers = faiss.InvertedListsPtrVector()
            for lists in shards:
                pointers.push_back(lists)
            ntotal = invlists.merge_from_multiple(pointers.data(), pointers.size(), False)
        index.ntotal = ivf.ntotal = ntotal
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
        write_index_atomically(index, Path(index_path))
        return index

    def clean(self) -> None:
        """Delete the shards and the trained copy once the merged index is written."""
        shutil.rmtree(self.shards, ignore_errors=True)
        (self.folder / TRAINED_FILE).unlink(missing_ok=True)


def drop_search_tables(index: faiss.Index) -> None:
    """Free an IVF-PQ index's precomputed search table (nlist x M x 256 floats: 1 GiB at 32768 lists of PQ32).

    Adding never reads it and every copy would carry it; reading the written index rebuilds it for search.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "precomputed_table"):
        ivfpq = faiss.downcast_index(ivf)
        ivfpq.use_precomputed_table = -1
        ivfpq.precomputed_table.resize(0)


def add_codes(index: faiss.Index, lists: np.ndarray, codes: np.ndarray, ids: np.ndarray) -> None:
    """Add entries by their list numbers [n] and encoded vectors [n, code_size] (uint8) with ids [n]: what
    ``add`` would store, without encoding (synthetic stores, codes made elsewhere)."""
    ivf = faiss.extract_index_ivf(index)
    coarse = ivf.coarse_code_size()
    n = len(lists)
    prefix = np.zeros((n, coarse), dtype=np.uint8)
    for b in range(coarse):  # list numbers as FAISS encodes them: little-endian bytes
        prefix[:, b] = (lists >> (8 * b)) & 0xFF
    sa = np.ascontiguousarray(np.concatenate([prefix, codes], axis=1))  # [n, coarse + code_size]
    ivf.add_sa_codes(sa, np.ascontiguousarray(ids, dtype=np.int64))
    if ivf is not index:
        index.ntotal = ivf.ntotal
