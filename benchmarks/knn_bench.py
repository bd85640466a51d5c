"""kNN pipeline speed, measured side by side in one run: datastore, index, search, targets.

    python benchmarks/knn_bench.py --run-dir runs/wt2 [--max-tokens 200000] [--k 64] [--out]

RUN must hold complete 'prepare' and 'train-lm' stages. Work happens in a scratch run directory (``--work-dir``,
default a temporary one) holding copies of RUN's tokens and LM, so RUN's own artifacts are never touched.
Reported ratios (targets in brackets):
  * datastore extraction tokens/s vs a plain LM forward (full model, no hook, no write) over the same windows
    (>= 0.85);
  * index build seconds; search queries/s at (k, nprobe) for a random sample of stored keys;
  * targets queries/s vs raw FAISS batch search of every key with the same index and k + 1 (>= 0.9).
``--out`` writes the numbers as JSON next to this script (or to the given path).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlpmem.artifacts import Environment, RunDir
from mlpmem.config import DatastoreConfig, IndexConfig, TargetsConfig
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.devices import resolve_device
from mlpmem.knn.datastore import build_datastore, window_sizes
from mlpmem.knn.index import build_index, load_index, set_nprobe
from mlpmem.knn.search import search
from mlpmem.knn.targets import SEARCH_BATCH, build_targets
from mlpmem.lm.load import load_lm, max_positions, run_lm_dir


def scratch_run(run_dir: Path, work_dir: Path, split: str, max_tokens: int | None) -> Path:
    """A run directory with RUN's tokens (the split cut to ``max_tokens``) and LM, registered as its own complete
    'prepare' and 'train-lm' stages through the stage API (RUN itself is only read)."""
    source = RunDir(run_dir)
    prep, lm = source.require("prepare"), source.require("train-lm")
    work = RunDir(work_dir)
    shutil.rmtree(work.path, ignore_errors=True)
    build = work.begin("prepare", prep.config, {})
    shutil.copytree(source.file("prepare", "tokenizer"), build.dir / "tokenizer")
    for name in prep.arrays:
        tokens = source.array("prepare", name, prep)
        tokens = tokens[:max_tokens] if name == split and max_tokens else tokens
        out = build.add_array(name, str(tokens.dtype), tokens.shape)
        out[:] = tokens
        out.flush()
    fields = ("source", "vocab_size", "tokenizer_fingerprint", "corpus_fingerprint")
    scratch_prep = build.complete(**{f: getattr(prep, f) for f in fields})
    build = work.begin("train-lm", lm.config, {"prepare": scratch_prep.fingerprint})
    shutil.copytree(source.file("train-lm", "model"), build.dir / "model")
    build.complete(model_fingerprint=lm.model_fingerprint)
    return work.path


def plain_forward_tokens_per_s(
    model: torch.nn.Module, tokens: np.ndarray, windows: list[Window], batch_size: int
) -> float:
    """The full LM over the datastore's windows: no hook, no write."""
    device = next(model.parameters()).device
    t0, n = time.time(), 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            length = max(w.end - w.begin for w in batch)
            ids = np.zeros((len(batch), length), dtype=np.int64)
            mask = np.zeros((len(batch), length), dtype=np.int64)
            for r, w in enumerate(batch):
                ids[r, : w.end - w.begin] = tokens[w.begin : w.end]
                mask[r, : w.end - w.begin] = 1
            model(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                use_cache=False,
            )
            n += sum(w.n_scored for w in batch)
    return n / (time.time() - t0)


def raw_faiss_queries_per_s(run: Path, k: int, nprobe: int | None) -> float:
    """FAISS alone: every stored key searched with k neighbours in SEARCH_BATCH batches (conversion untimed)."""
    index, _ = load_index(run, use_gpu="auto")
    set_nprobe(index, nprobe)
    keys = RunDir(run).array("datastore", "keys")
    seconds = 0.0
    for a in range(0, len(keys), SEARCH_BATCH):
        q = np.ascontiguousarray(keys[a : a + SEARCH_BATCH], dtype=np.float32)
        t0 = time.time()
        index.search(q, k)
        seconds += time.time() - t0
    return len(keys) / seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="run with complete prepare and lm stages")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch run directory (default: temporary)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the split")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--k", type=int, default=64, help="neighbours for search and targets")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: the index's own)")
    p.add_argument("--factory", default=None, help="FAISS factory (default: chosen from size)")
    p.add_argument("--search-queries", type=int, default=4096, help="stored keys used as search queries")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).with_suffix(".json")),
        default=None,
        help="write the results as JSON (default path: next to this script)",
    )
    args = p.parse_args(argv)

    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="knn_bench_")
    run = scratch_run(args.run_dir, args.work_dir or Path(tmp.name), args.split, args.max_tokens)
    try:
        config = DatastoreConfig(run_dir=run, split=args.split, batch_size=args.batch_size, device=args.device)
        model = load_lm(run_lm_dir(run), resolve_device(args.device))
        context, stride = window_sizes(config, RunDir(run).require("train-lm"), max_positions(model))
        tokens = RunDir(run).array("prepare", args.split)
        windows = sliding_windows(len(tokens), context, stride)
        plain_forward_tokens_per_s(model, tokens, windows[: 2 * args.batch_size], args.batch_size)  # warm-up
        ds = build_datastore(config)
        plain = plain_forward_tokens_per_s(model, tokens, windows, args.batch_size)
        del model
        idx = build_index(IndexConfig(run_dir=run, factory=args.factory))
        nprobe = args.nprobe or idx.nprobe

        index, _ = load_index(run, use_gpu="auto")
        keys = RunDir(run).array("datastore", "keys")
        rows = np.sort(np.random.default_rng(0).choice(len(keys), min(args.search_queries, len(keys)), replace=False))
        queries = np.asarray(keys[rows], dtype=np.float32)
        t0 = time.time()
        search(index, queries, args.k, nprobe=nprobe)
        search_qps = len(queries) / (time.time() - t0)

        tg = build_targets(TargetsConfig(run_dir=run, k=args.k, nprobe=nprobe))
        raw = raw_faiss_queries_per_s(run, args.k + 1, nprobe)
    finally:
        if tmp is not None:
            tmp.cleanup()

    extract = ds.timings["tokens_per_second"]
    results = {
        "run_dir": str(args.run_dir),
        "entries": ds.entries,
        "key_dim": ds.key_dim,
        "context": ds.context,
        "stride": ds.stride,
        "datastore_tokens_per_s": extract,
        "plain_forward_tokens_per_s": round(plain, 1),
        "datastore_vs_forward": round(extract / plain, 3),
        "factory": idx.factory,
        "index_build_seconds": idx.timings["build_seconds"],
        "index_peak_rss_mb": idx.peak_rss_mb,
        "k": args.k,
        "nprobe": nprobe,
        "search_queries_per_s": round(search_qps, 1),
        "targets_queries_per_s": tg.timings["queries_per_second"],
        "raw_faiss_queries_per_s": round(raw, 1),
        "targets_vs_raw_faiss": round(tg.timings["queries_per_second"] / raw, 3),
        "environment": Environment.current().model_dump(),
    }
    rows_out = [
        (
            "datastore extraction",
            f"{extract:,.0f} tok/s",
            f"plain LM forward {plain:,.0f} tok/s",
            results["datastore_vs_forward"],
            0.85,
        ),
        ("index build", f"{results['index_build_seconds']:.1f} s", results["factory"], None, None),
        ("search", f"{search_qps:,.0f} q/s", f"k={args.k} nprobe={nprobe}", None, None),
        (
            "targets",
            f"{results['targets_queries_per_s']:,.0f} q/s",
            f"raw FAISS {raw:,.0f} q/s",
            results["targets_vs_raw_faiss"],
            0.9,
        ),
    ]
    print(f"{'stage':<22}{'measured':>16}   {'reference':<34}{'ratio':>7}  target")
    for name, measured, ref, ratio, target in rows_out:
        print(
            f"{name:<22}{measured:>16}   {ref:<34}{'' if ratio is None else f'{ratio:.3f}':>7}  "
            f"{'' if target is None else f'>= {target}'}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
