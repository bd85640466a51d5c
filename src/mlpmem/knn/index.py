"""FAISS index over the datastore keys (squared L2).  ``mlpmem index --run-dir RUN``

Default factory from the datastore size N and key width d:
  * N < flat_threshold: ``Flat`` (exact).
  * else ``IVF{nlist},PQ{m}``: nlist = 4·sqrt(N) rounded to a power of two, clamped to [256, 65536] and to
    at most (training sample / 39) so that k-means has enough points per list; m = the largest of 64, 32, 16,
    8 dividing d with sub-vectors of at least 8 dimensions (d = 256 -> PQ32, d = 768/1024/1280 -> PQ64: at most
    64-byte codes, the reference size), else the largest leaving sub-vectors of >= 2 dims (d = 32 -> PQ16),
    else ``IVF{nlist},Flat``. nprobe defaults to min(32, nlist).
The quantizers are trained on a seeded random sample; keys are added in float32 chunks (never a full float32
copy); PQ codes skip polysemous training (used only for Hamming filtering, never here). The CPU index is
written atomically to ``RUN/index/index.faiss``; a factory whose lists outnumber the training keys is refused before
any work. Under a launch of N processes each encodes its block of stored keys and the main process merges them
(``mlpmem.knn.index_shards``). ``--on-disk`` keeps the inverted lists in ``lists.bin``, built in resumable shards
(``knn.ondisk``).
A streamed datastore (``datastore --keys streamed``) has its keys recomputed by the LM and streamed into the index
(``knn.stream``); its default factory is never Flat, and an uncompressed one is refused.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import faiss
import numpy as np

from mlpmem.artifacts import ArraySpec, RunDir
from mlpmem.config import IndexConfig
from mlpmem.distributed import begin_shared, process_state
from mlpmem.errors import UsageError
from mlpmem.knn.index_shards import add_sharded, shardable
from mlpmem.knn.ondisk import LISTS_FILE, TRAINED_FILE, OnDiskBuild, read_any_index, write_index_atomically
from mlpmem.knn.stream import key_source
from mlpmem.manifests import IndexManifest
from mlpmem.progress import progress

INDEX_FILE = "index.faiss"
PQ_CHOICES = (64, 32, 16, 8)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def default_factory(n: int, d: int, flat_threshold: int, train_size: int) -> str:
    """The factory string chosen from the datastore size (see module docstring)."""
    if n < flat_threshold:
        return "Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n))))
    nlist = min(max(nlist, 256), 65536, _pow2_floor(min(train_size, n) / 39))
    m = next((m for m in PQ_CHOICES if d % m == 0 and d // m >= 8), None)
    m = m or next((m for m in PQ_CHOICES if d % m == 0 and d // m >= 2), None)
    return f"IVF{nlist},PQ{m}" if m else f"IVF{nlist},Flat"


def set_nprobe(index: faiss.Index, nprobe: int | None) -> None:
    """Set the IVF lists searched (CPU or GPU index); a no-op for indexes without lists or for None."""
    if nprobe is None:
        return
    ivf = faiss.try_extract_index_ivf(index)  # CPU IVF, also inside IndexPreTransform / IDMap
    if ivf is not None:
        ivf.nprobe = int(nprobe)
    elif hasattr(faiss, "GpuParameterSpace"):  # GPU IVF indexes and their replicas
        try:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        except RuntimeError:
            pass  # no lists (Flat)


def index_nlist(index: faiss.Index) -> int | None:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else None


def _to_gpu(index: faiss.Index, use_gpu: str) -> tuple[faiss.Index, bool]:
    """The index cloned to all GPUs when wanted and possible; (index, on_gpu)."""
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "no" or (use_gpu == "auto" and n_gpus == 0):
        return index, False
    if n_gpus == 0:
        raise UsageError("FAISS sees no GPU (install faiss-gpu, or use auto)", field="use_gpu")
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except RuntimeError as err:
        if use_gpu == "yes":
            raise UsageError(
                f"this index cannot run on the GPU: {str(err).strip().splitlines()[0]}", field="use_gpu"
            ) from None
        return index, False


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux


def make_index(factory: str, d: int, use_gpu: str) -> tuple[faiss.Index, int | None, bool]:
    """An empty index from a factory string (polysemous training off); (index, nlist, on_gpu)."""
    try:
        cpu_index = faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise UsageError(
            f"{factory!r} is not a FAISS factory string: {str(err).strip().splitlines()[-1]}", field="factory"
        ) from None
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # polysemous codes only serve Hamming filtering, which we never use; their training dominated build time
        faiss.downcast_index(ivf).do_polysemous_training = False
    index, on_gpu = _to_gpu(cpu_index, use_gpu)
    return index, index_nlist(cpu_index), on_gpu


MIN_KEYS_PER_LIST = 39  # FAISS's own lower bound for a k-means it trusts


def check_trainable(nlist: int | None, n_train: int, factory: str) -> None:
    """Refuse, before any work, a factory whose k-means would get fewer than 39 training keys per list."""
    if nlist is not None and n_train < MIN_KEYS_PER_LIST * nlist:
        raise UsageError(
            f"{factory!r} has {nlist} lists but only {n_train} keys to train them (at least "
            f"{MIN_KEYS_PER_LIST} per list); use fewer lists, a larger --train-size or more keys",
            field="factory",
        )


def build_index(config: IndexConfig) -> IndexManifest:
    """Build, train, fill and save the FAISS index of the run's datastore; returns the index manifest.

    Keys come from the datastore's memmap, or from the LM when the datastore streams them (``knn.stream``).
    """
    run = RunDir(config.run_dir)
    datastore = run.require("datastore")
    inputs = {"datastore": datastore.fingerprint}
    if (done := run.reusable("index", config, inputs)) is not None:
        return done
    streamed = "keys" not in datastore.arrays
    n, d = datastore.entries, datastore.key_dim
    factory = config.factory or default_factory(n, d, 0 if streamed else config.flat_threshold, config.train_size)
    index, nlist, on_gpu = make_index(factory, d, "no" if config.on_disk else config.use_gpu)
    check_streamable(index, factory, streamed, config.on_disk)
    n_train = min(config.train_size, n)
    check_trainable(nlist, n_train, factory)
    nprobe = config.nprobe or (min(32, nlist) if nlist else None)
    source = key_source(run.path, datastore, config.device, config.batch_size)

    state, _ = process_state("auto")
    build = begin_shared(run, "index", config, inputs, state)
    t0 = time.time()
    resumed = config.on_disk and (build.dir / TRAINED_FILE).is_file()  # trained before a kill: kept
    if state.is_main_process and not index.is_trained and not resumed:
        train(index, source.sample(n_train, config.seed), factory)
    train_seconds = time.time() - t0
    sharded = state.num_processes > 1 and shardable(index) and not config.on_disk
    if sharded:  # each rank encodes its block of the (stored or streamed) keys on the CPU; the main process merges
        trained = (faiss.index_gpu_to_cpu(index) if on_gpu else index) if state.is_main_process else None
        index = add_sharded(trained, source, config.add_chunk, state, build.dir)
    if not state.is_main_process:  # on-disk lists (and indexes without lists) are built by the main process alone
        state.wait_for_everyone()
        return run.require("index")
    if not sharded:
        index = fill(index, source, config, build.dir, None if resumed else index)
        index = faiss.index_gpu_to_cpu(index) if on_gpu else index
    if index.ntotal != n:  # every key, once: nothing a resume skipped or added twice
        raise UsageError(
            f"the index holds {index.ntotal} keys, the datastore {n}; remove {build.dir} and rerun `mlpmem index`"
        )
    set_nprobe(index, nprobe)
    build_seconds = time.time() - t0
    write_index_atomically(index, build.dir / INDEX_FILE)
    if config.on_disk:
        build.manifest.arrays = {**build.manifest.arrays, "lists": lists_spec(build.dir)}
    build.manifest.timings = {
        **build.manifest.timings,
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(build_seconds, 2),
    }
    manifest = build.complete(
        factory=factory,
        nlist=nlist,
        nprobe=nprobe,
        ntotal=int(index.ntotal),
        built_on_gpu=on_gpu,
        on_disk=config.on_disk,
        peak_rss_mb=_peak_rss_mb(),
    )
    state.wait_for_everyone()
    return manifest


def fill(index: faiss.Index, source, config: IndexConfig, folder: Path, fresh: faiss.Index | None) -> faiss.Index:
    """Add every key of ``source`` in chunks (main process): into ``index``, or, with ``--on-disk``, into resumable
    list shards merged into ``lists.bin`` (``fresh``: the trained index; None when resuming after a kill)."""
    ranges = source.ranges(config.add_chunk)
    bar = progress(total=source.n, unit="key", unit_scale=True, desc="index")
    if config.on_disk:
        builder = OnDiskBuild(folder, fresh)
        for c, (a, b) in enumerate(ranges):
            builder.add_chunk(c, lambda shard, a=a, b=b: shard.add_with_ids(source.range(a, b), np.arange(a, b)))
            bar.update(b - a)
        index = builder.merge(folder / INDEX_FILE, len(ranges))
        builder.clean()
    else:
        for a, b in ranges:
            index.add(source.range(a, b))
            bar.update(b - a)
    bar.close()
    return index


def train(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    """Train the quantizers on keys [n_train, d] float32."""
    try:
        index.train(sample)
    except RuntimeError as err:
        raise UsageError(
            f"cannot train {factory!r} on {len(sample)} keys: {str(err).strip().splitlines()[-1]}", field="factory"
        ) from None


def check_streamable(index: faiss.Index, factory: str, streamed: bool, on_disk: bool) -> None:
    """Refuse, before any work, an on-disk index without lists, and an uncompressed index of streamed keys."""
    ivf = faiss.try_extract_index_ivf(index)
    if on_disk and ivf is None:
        raise UsageError(f"--on-disk needs an IVF index (inverted lists); {factory!r} has none", field="factory")
    if streamed and (ivf is None or faiss.downcast_index(ivf).code_size >= 4 * index.d):
        raise UsageError(
            f"a streamed datastore keeps no keys, so its index must compress them (IVF-PQ); {factory!r} would store "
            "them in full (use the default factory, or store the keys: datastore --keys stored)",
            field="factory",
        )


def lists_spec(folder: Path) -> ArraySpec:
    """``lists.bin`` recorded as a raw array (its size is checked on every read, its hash only at completion)."""
    return ArraySpec(file=LISTS_FILE, dtype="uint8", shape=[(folder / LISTS_FILE).stat().st_size])


def load_index(run_dir: Path, use_gpu: str = "no") -> tuple[faiss.Index, IndexManifest]:
    """The run's index (nprobe set from its manifest) and its manifest.

    ``RunDir.require`` has checked the file's size and content hash and that the index was built over the run's
    current datastore; the index's width is checked against the datastore's keys. ``use_gpu`` ("no", "auto",
    "yes") clones it to the GPUs.
    """
    run = RunDir(run_dir)
    manifest, datastore = run.require("index"), run.require("datastore")
    path = run.file("index", INDEX_FILE)
    try:
        index = read_any_index(path)  # on-disk lists are mapped from the index's folder
    except RuntimeError as err:
        raise UsageError(
            f"{path} is not a readable FAISS index ({str(err).strip().splitlines()[-1][:80]}); "
            + run.rebuild_hint("index")
        ) from None
    if index.d != datastore.key_dim or index.ntotal != datastore.entries:
        raise UsageError(
            f"{path} holds {index.ntotal} keys of width {index.d}, the datastore {datastore.entries} of width "
            f"{datastore.key_dim}; " + run.rebuild_hint("index")
        )
    if not manifest.on_disk:
        index, _ = _to_gpu(index, use_gpu)
    set_nprobe(index, manifest.nprobe)
    return index, manifest
