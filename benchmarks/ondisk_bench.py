"""A store larger than RAM: build and search an IVF-PQ index with on-disk inverted lists, reporting peak RSS.

    python benchmarks/ondisk_bench.py --entries 100000000 --dim 768 --pq 32 --threads 2 \
        --out benchmarks/results/ondisk-bench.json

The store is synthetic: keys of width ``--dim`` represented by their IVF list and PQ code, both drawn at random
chunk by chunk (``--chunk`` entries, seeded per chunk) and added without encoding (``add_codes``); encoding real
keys costs the same per entry whatever the store's size and is not what this measures. The coarse centroids are
random Gaussian points and the PQ codebooks are trained on residuals around them, so queries (a centroid plus
noise) are scored by the real ADC tables. The build is the one ``mlpmem index --on-disk`` runs (``OnDiskBuild``:
a shard per chunk, resumable, then one merge); the work folder is deleted afterwards unless ``--keep``.
Reported: build seconds (shards, merge), queries/s at (k, nprobe), bytes on disk, and peak memory:
``ru_maxrss`` (counts the mapped list pages the process touched: cache the kernel may drop) and the peak of
anonymous RSS (``RssAnon``, sampled every 50 ms: the memory the process really needs), after training, after the
build, and overall (searching rebuilds the IVF-PQ precomputed table: nlist x PQ x 256 floats).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from mlpmem.artifacts import Environment
from mlpmem.bench.synthetic import CENTROID_SCALE, PQ_TRAIN, ivfpq_geometry
from mlpmem.knn.ondisk import LISTS_FILE, OnDiskBuild, add_codes, drop_search_tables, read_any_index


class PeakMemory:
    """Peak anonymous RSS (MiB) of this process, sampled from /proc/self/status in a background thread."""

    def __init__(self, every: float = 0.05):
        self.peak_anon_mb, self.every, self._stop = 0.0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def anon_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_mb = max(self.peak_anon_mb, self.anon_mb())
            time.sleep(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def trained_index(d: int, nlist: int, m: int, rng: np.random.Generator) -> tuple[faiss.IndexIVFPQ, np.ndarray]:
    """An empty IVF-PQ index over random centroids [nlist, d] with PQ codebooks trained on residuals."""
    centroids = rng.standard_normal((nlist, d), dtype=np.float32) * CENTROID_SCALE
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8)
    index.do_polysemous_training = False
    sample = centroids[rng.integers(nlist, size=PQ_TRAIN)] + rng.standard_normal((PQ_TRAIN, d), dtype=np.float32)
    index.train(sample)  # the quantizer holds its centroids already: only PQ is trained
    drop_search_tables(index)  # not needed to add
    return index, centroids


def build(args, work: Path, index: faiss.Index, nlist: int, m: int) -> dict:
    """Shards of random (list, code) entries, then the merge; seconds of each."""
    builder = OnDiskBuild(work, index)
    n_chunks = -(-args.entries // args.chunk)
    t0 = time.time()
    for c in range(n_chunks):
        a, b = c * args.chunk, min(args.entries, (c + 1) * args.chunk)
        rng = np.random.default_rng([args.seed, c])
        lists = rng.integers(nlist, size=b - a, dtype=np.int64)  # [n]
        codes = rng.integers(0, 256, size=(b - a, m), dtype=np.uint8)  # [n, m]
        ids = np.arange(a, b)
        if builder.add_chunk(c, lambda shard, lists=lists, codes=codes, ids=ids: add_codes(shard, lists, codes, ids)):
            print(f"chunk {c + 1}/{n_chunks} ({b:,} entries) {time.time() - t0:.0f} s", flush=True)
    shards_s = time.time() - t0
    shard_bytes = sum(p.stat().st_size for p in builder.shards.glob("*.lists"))
    t1 = time.time()
    builder.merge(work / "index.faiss", n_chunks)
    merge_s = time.time() - t1
    builder.clean()
    return {"shards_seconds": round(shards_s, 1), "merge_seconds": round(merge_s, 1), "shard_bytes": shard_bytes}


def search(args, work: Path, centroids: np.ndarray, nlist: int) -> dict:
    """Queries/s of the mapped index at (k, nprobe), over queries near random centroids."""
    index = read_any_index(work / "index.faiss")
    faiss.extract_index_ivf(index).nprobe = min(args.nprobe, nlist)
    rng = np.random.default_rng([args.seed, 1 << 31])
    d = centroids.shape[1]
    queries = centroids[rng.integers(nlist, size=args.queries)] + rng.standard_normal(
        (args.queries, d), dtype=np.float32
    )  # [Q, d]
    out = {}
    for label in ("first", "second"):  # first: lists read from disk (or cache); second: the same lists again
        t0 = time.time()
        for a in range(0, args.queries, args.batch):
            dists, ids = index.search(queries[a : a + args.batch], args.k)  # [b, k]
        out[f"queries_per_second_{label}"] = round(args.queries / (time.time() - t0), 1)
    out["found_per_query"] = float((ids >= 0).sum(axis=1).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000_000)
    p.add_argument("--dim", type=int, default=768, help="key width (768: GPT-2 small)")
    p.add_argument("--pq", type=int, default=32, help="PQ code bytes per entry")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists; default: as `mlpmem bench` sizes them")
    p.add_argument("--chunk", type=int, default=4_000_000, help="entries per shard (RAM of the build)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100, help="queries per search call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("runs/ondisk-bench"), help="resumes a killed build")
    p.add_argument("--keep", action="store_true", help="keep the index files")
    p.add_argument("--out", nargs="?", const=Path(__file__).parent / "results" / "ondisk-bench.json", type=Path)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    nlist = args.nlist or ivfpq_geometry(args.entries, args.dim, args.k, args.nprobe)[0]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with PeakMemory() as peak:
        t0 = time.time()
        index, centroids = trained_index(args.dim, nlist, args.pq, np.random.default_rng(args.seed))
        train_s, train_anon = time.time() - t0, peak.peak_anon_mb
        built = build(args, args.work_dir, index, nlist, args.pq)
        del index
        build_rss, build_anon = maxrss_mb(), peak.peak_anon_mb
        disk = {p.name: p.stat().st_size for p in args.work_dir.iterdir() if p.is_file()}
        searched = search(args, args.work_dir, centroids, nlist)
    result = {
        "entries": args.entries,
        "dim": args.dim,
        "factory": f"IVF{nlist},PQ{args.pq}",
        "chunk": args.chunk,
        "train_seconds": round(train_s, 1),
        "peak_anon_rss_mb_train": round(train_anon, 1),
        "k": args.k,
        "nprobe": args.nprobe,
        "threads": args.threads,
        **built,
        "lists_bytes": disk.get(LISTS_FILE),
        "index_header_bytes": disk.get("index.faiss"),
        "bytes_per_entry": round(disk.get(LISTS_FILE, 0) / args.entries, 2),
        **searched,
        "peak_rss_mb_build": round(build_rss, 1),
        "peak_anon_rss_mb_build": round(build_anon, 1),
        "peak_rss_mb": round(maxrss_mb(), 1),
        "peak_anon_rss_mb": round(peak.peak_anon_mb, 1),
        "environment": Environment.current().model_dump(),
    }
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
