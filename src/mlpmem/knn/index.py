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
written atomically to ``RUN/index/index.faiss``.
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mlpmem.artifacts import Stage, open_array, require_stage
from mlpmem.config import IndexConfig
from mlpmem.errors import UsageError

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
        raise UsageError("--use-gpu yes: FAISS sees no GPU (install faiss-gpu, or use --use-gpu auto)")
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except RuntimeError as err:
        if use_gpu == "yes":
            raise UsageError(f"--use-gpu yes: this index cannot run on the GPU: {str(err).strip().splitlines()[0]}") from None
        return index, False


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux


def build_index(config: IndexConfig) -> dict[str, Any]:
    """Build, train, fill and save the FAISS index of the run's datastore; returns the index manifest."""
    run_dir = Path(config.run_dir)
    datastore = require_stage(run_dir, "datastore", f"mlpmem datastore --run-dir {run_dir}")
    stage = Stage(run_dir, "index")
    if stage.begin(config.model_dump(mode="json", exclude={"run_dir"}), {"datastore": datastore["fingerprint"]}) == "complete":
        return stage.manifest
    keys = open_array(run_dir, "datastore", "keys")  # [N, d] memmap
    n, d = keys.shape
    factory = config.factory or default_factory(n, d, config.flat_threshold, config.train_size)
    try:
        cpu_index = faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise UsageError(f"--factory {factory!r} is not a FAISS factory string: {str(err).strip().splitlines()[-1]}") from None
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # polysemous codes only serve Hamming filtering, which we never use; their training dominated build time
        faiss.downcast_index(ivf).do_polysemous_training = False
    nlist = index_nlist(cpu_index)
    nprobe = config.nprobe or (min(32, nlist) if nlist else None)
    index, on_gpu = _to_gpu(cpu_index, config.use_gpu)

    t0 = time.time()
    if not index.is_trained:
        n_train = min(config.train_size, n)
        rows = np.sort(np.random.default_rng(config.seed).choice(n, n_train, replace=False))
        sample = np.ascontiguousarray(keys[rows], dtype=np.float32)  # [n_train, d]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise UsageError(f"cannot train {factory!r} on {n_train} keys (use a smaller nlist or more --train-size): {str(err).strip().splitlines()[-1]}") from None
        del sample
    train_seconds = time.time() - t0
    for a in range(0, n, config.add_chunk):
        index.add(np.ascontiguousarray(keys[a : a + config.add_chunk], dtype=np.float32))
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_nprobe(index, nprobe)
    build_seconds = time.time() - t0

    tmp = stage.dir / f".{INDEX_FILE}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, stage.dir / INDEX_FILE)
    stage.manifest["timings"].update(train_seconds=round(train_seconds, 2), build_seconds=round(build_seconds, 2))
    return stage.complete(
        {"ntotal": int(index.ntotal)},
        factory=factory,
        metric="squared_l2",
        nlist=nlist,
        nprobe=nprobe,
        ntotal=int(index.ntotal),
        dim=int(d),
        key_layer=datastore.get("key_layer"),
        datastore_fingerprint=datastore["fingerprint"],
        index_file=INDEX_FILE,
        index_bytes=(stage.dir / INDEX_FILE).stat().st_size,
        built_on_gpu=on_gpu,
        peak_rss_mb=_peak_rss_mb(),
    )


def load_index(
    run_dir: Path, expected_datastore_manifest: dict[str, Any] | None = None, use_gpu: str = "no"
) -> tuple[faiss.Index, dict[str, Any]]:
    """The run's index (nprobe set from its manifest) and its manifest.

    Refuses, with one line, an index built over another datastore than ``expected_datastore_manifest``
    (default: the run's own datastore) or of another key width. ``use_gpu`` ("no", "auto", "yes") clones it
    to the GPUs.
    """
    run_dir = Path(run_dir)
    manifest = require_stage(run_dir, "index", f"mlpmem index --run-dir {run_dir}")
    datastore = expected_datastore_manifest or require_stage(run_dir, "datastore", f"mlpmem datastore --run-dir {run_dir}")
    built_over = manifest.get("inputs", {}).get("datastore")
    if built_over != datastore.get("fingerprint"):
        raise UsageError(
            f"{run_dir / 'index'} was built over another datastore (fingerprint {built_over}, "
            f"expected {datastore.get('fingerprint')}); rerun `mlpmem index --run-dir {run_dir}`"
        )
    if manifest.get("dim") != datastore.get("key_dim"):
        raise UsageError(f"index dimension {manifest.get('dim')} does not match the datastore's key width {datastore.get('key_dim')}")
    index = faiss.read_index(str(run_dir / "index" / manifest.get("index_file", INDEX_FILE)))
    if index.d != manifest["dim"]:
        raise UsageError(f"{run_dir / 'index' / INDEX_FILE} has dimension {index.d}, its manifest says {manifest['dim']}")
    index, _ = _to_gpu(index, use_gpu)
    set_nprobe(index, manifest.get("nprobe"))
    return index, manifest
