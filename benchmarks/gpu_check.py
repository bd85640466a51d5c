"""The GPU check's Python half (run by ``benchmarks/gpu_check.sh``): the demo's FAISS index on the GPU against the
CPU one, and the summary JSON of every step.

    python benchmarks/gpu_check.py faiss --run-dir RUN --device cuda --out FAISS.json
    python benchmarks/gpu_check.py summary --out-dir OUT --steps STEPS.tsv --run-dir RUN --junit-dir JUNIT \
        --faiss FAISS.json

``faiss`` searches a seeded sample of the run's stored keys (k nearest, squared L2) with: the exact FAISS Flat
index on the CPU (the reference), the run's own index on the CPU (``load_index``), the same index cloned to the GPU
and an index of the same factory trained and filled on the GPU (the paths ``index --use-gpu`` and ``targets``
take; only with a GPU build of FAISS), and an exact search in torch on the device. Each row gives queries/s and
recall@k against the reference. ``summary`` writes OUT/gpu-check.json: each step's status and seconds, the
provenance (GPU, torch and CUDA versions, commit), the test counts from the JUnit files, the demo's perplexities
and stage times, the bench file's headline rows and the FAISS figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from mlpmem.errors import UsageError

# Why the faiss carried in .whl/ is faiss-cpu (wheel sizes read from the package registry when the check was
# written): the GPU builds need CUDA libraries far over the ~60 MiB a device run may carry, or CUDA 12 where torch
# brings CUDA 13.
NO_FAISS_GPU = (
    "FAISS sees no GPU; the faiss carried is faiss-cpu because faiss-gpu-cu12 (48 MB) needs CUDA 12's cuBLAS "
    "(nvidia-cublas-cu12, 581 MB) where torch brings CUDA 13; the CUDA 13 builds (faiss-gpu-cuvs 1.15.1, 119 MB; "
    "faiss-gpu-cu13-cuvs 1.15.0, 81 MB) also need libcuvs-cu13 (222 MB): over what a run without network may carry"
)


def timed(fn, repeats: int = 2):
    """(fastest of ``repeats`` timed calls after one warm-up, the last call's result); fn waits for its device."""
    result, times = fn(), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true k neighbours found ([Q, k] ids against [Q, k] ids)."""
    return float(np.mean([np.isin(row, ref).mean() for row, ref in zip(ids, truth)]))


def faiss_rows(run_dir: Path, device: str, n_queries: int, k: int) -> dict:
    import faiss
    import torch

    from mlpmem.artifacts import RunDir
    from mlpmem.knn.index import load_index, make_index, set_nprobe
    from mlpmem.knn.search import search

    run = RunDir(run_dir)
    keys = np.ascontiguousarray(run.array("datastore", "keys"), dtype=np.float32)  # [N, d]
    n, d = keys.shape
    queries = keys[np.sort(np.random.default_rng(0).choice(n, n_queries, replace=False))]  # [Q, d]
    flat = faiss.IndexFlatL2(d)
    flat.add(keys)
    _, truth = flat.search(queries, k)  # [Q, k] exact reference
    cpu_index, manifest = load_index(run.path)
    rows = {}

    def row(name: str, index, **extra) -> None:
        seconds, (_, ids) = timed(lambda: search(index, queries, k))
        rows[name] = dict(queries_per_s=round(n_queries / seconds), recall=recall(ids, truth), **extra)

    row("cpu flat (exact)", flat)
    row(f"cpu {manifest.factory}, nprobe {manifest.nprobe}", cpu_index)
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus and device != "cpu":
        try:
            gpu_index, _ = load_index(run.path, use_gpu="yes")
            row(f"gpu {manifest.factory} (the run's index cloned), nprobe {manifest.nprobe}", gpu_index)
            start = time.perf_counter()
            built, _, _ = make_index(manifest.factory, d, "yes")
            built.train(keys[np.sort(np.random.default_rng(1).choice(n, min(n, 100_000), replace=False))])
            built.add(keys)
            set_nprobe(built, manifest.nprobe)
            build_s = round(time.perf_counter() - start, 2)
            row(f"gpu {manifest.factory} (trained and filled there), nprobe {manifest.nprobe}", built, build_s=build_s)
            row("gpu flat (exact)", faiss.index_cpu_to_all_gpus(flat))
        except Exception as err:  # a failing GPU path is a finding: keep the other rows
            rows["gpu error"] = f"{type(err).__name__}: {str(err).strip()[:300]}"
    stored, q = torch.from_numpy(keys).to(device), torch.from_numpy(queries).to(device)  # [N, d], [Q, d]

    def torch_exact() -> np.ndarray:
        sq = (q * q).sum(1, keepdim=True) - 2 * q @ stored.T + (stored * stored).sum(1)  # [Q, N] float32
        return sq.topk(k, dim=1, largest=False).indices.cpu().numpy()  # [Q, k]; .cpu() waits for the device

    seconds, ids = timed(torch_exact)
    rows[f"torch exact on {device}"] = dict(queries_per_s=round(n_queries / seconds), recall=recall(ids, truth))
    return dict(
        entries=n,
        key_dim=d,
        queries=n_queries,
        k=k,
        faiss=faiss.__version__,
        faiss_gpus=n_gpus,
        faiss_gpu=None if n_gpus else NO_FAISS_GPU,
        rows=rows,
    )


def junit_counts(path: Path) -> dict | None:
    """Test counts of a JUnit XML file, and the ids of the tests that failed or errored."""
    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts, passed=passed, failed=failed)


def read_steps(path: Path) -> dict:
    """NAME<TAB>RC<TAB>SECONDS<TAB>LIMIT rows (RC may be 'skipped: why') as {name: {status, seconds, limit_s}}."""
    steps = {}
    for line in path.read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        status = rc if not rc.lstrip("-").isdigit() else {"0": "ok", "124": "timed out", "137": "timed out"}.get(rc)
        steps[name] = dict(status=status or f"failed (exit {rc})", seconds=round(float(seconds), 1), limit_s=int(limit))
    return steps


def provenance() -> dict:
    import torch

    info = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        git_commit=os.environ.get("GIT_COMMIT"),
    )
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"not run: {err}"
    for module in ("mlpmem", "transformers", "faiss", "fla", "pydantic", "triton"):
        try:
            info[module] = __import__(module).__version__
        except Exception as err:  # a missing or broken package is a finding, not a crash
            info[module] = f"unavailable: {type(err).__name__}: {err}"[:200]
    try:
        from mlpmem.artifacts import git_commit

        info["git_commit"] = info["git_commit"] or git_commit()  # GIT_COMMIT names what was sent
    except Exception:
        pass
    return info


def demo_summary(run_dir: Path) -> dict:
    """The demo's perplexities, and each stage's status, seconds and device from its manifest."""
    from mlpmem.artifacts import RunDir
    from mlpmem.stages import BUILD_STAGES

    out = {}
    results = run_dir / "evaluate" / "results.json"
    if results.exists():
        fields = ("valid_ppl", "test_ppl", "lmbda", "temperature")
        out["systems"] = {s["name"]: {f: s[f] for f in fields} for s in json.loads(results.read_text())["systems"]}
    run, out["stages"] = RunDir(run_dir), {}
    for stage in BUILD_STAGES:
        if (run.folder(stage)).exists() or run.partial_folder(stage).exists():
            m = run.read(stage)
            out["stages"][stage] = (
                "not complete"
                if m is None
                else dict(status=m.status, seconds=m.timings.get("seconds"), device=getattr(m.config, "device", None))
            )
    return out


def summary(args: argparse.Namespace) -> None:
    report = dict(steps=read_steps(args.steps), device=args.device)
    for name, part in (("provenance", provenance), ("demo", lambda: demo_summary(args.run_dir))):
        try:
            report[name] = part()
        except Exception as err:
            report[name] = f"could not be read: {type(err).__name__}: {err}"
    report["tests"] = {p.stem: junit_counts(p) for p in sorted(args.junit_dir.glob("*.xml"))}
    report["faiss"] = json.loads(args.faiss.read_text()) if args.faiss.exists() else None
    bench = args.out_dir / "bench.json"
    if bench.exists():  # the headline rows; the whole file is beside this one
        b = json.loads(bench.read_text())
        report["bench"] = {key: b.get(key) for key in ("device", "seconds", "summary", "decode_ms_all", "results")}
    else:
        report["bench"] = None
    path = args.out_dir / "gpu-check.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report["steps"], indent=1))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("faiss", help="FAISS on the GPU against the CPU over the run's stored keys")
    f.add_argument("--run-dir", type=Path, required=True)
    f.add_argument("--device", default="cuda")
    f.add_argument("--queries", type=int, default=2000)
    f.add_argument("--k", type=int, default=64)
    f.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary", help="OUT/gpu-check.json from the steps file and what the steps wrote")
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--steps", type=Path, required=True)
    s.add_argument("--run-dir", type=Path, required=True)
    s.add_argument("--junit-dir", type=Path, required=True)
    s.add_argument("--faiss", type=Path, required=True)
    s.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.command == "faiss":
        try:
            figures = faiss_rows(args.run_dir, args.device, args.queries, args.k)
        except UsageError as err:  # e.g. the demo did not finish its datastore and index
            sys.exit(f"gpu_check faiss: {err}")
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
        print(json.dumps(figures, indent=1))
    else:
        summary(args)


if __name__ == "__main__":
    main()
