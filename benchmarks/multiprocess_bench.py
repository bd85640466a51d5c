"""Speed-up of the heavy stages with N processes (``accelerate launch --multi_gpu --num_processes N``) over one.

    python benchmarks/multiprocess_bench.py --run-dir runs/demo [--processes 2] [--repeats 3] [--out FILE.json]

Each stage of RUN (datastore, index, targets, train-memory, evaluate) is rebuilt in a scratch run directory whose
other stages are links to RUN's (RUN is only read), with the config recorded in RUN's manifest, by one process and
by one process of one thread, and by N processes (each the cores shared out: ``1x`` and ``Nx`` use every core); runs
alternate so that all see the same machine load. Reported per stage: the median over repeats of the stage's build
time (its manifest's ``timings.seconds``, from the stage's start to its completion) and of the command's wall time
(process start, imports and model loading included), and the speed-ups of N processes over one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mlpmem.artifacts import Environment, RunDir

STAGES = ("datastore", "index", "targets", "train-memory", "evaluate")


def scratch(run: RunDir, stage: str, folder: Path, changes: dict[str, object]) -> Path:
    """A run directory linking every complete stage of RUN but ``stage``, and ``stage``'s config (with ``changes``)
    as YAML."""
    folder.mkdir(parents=True)
    for other in run.path.iterdir():
        if other.is_dir() and other.name != stage and (other / "manifest.json").is_file():
            (folder / other.name).symlink_to(other.resolve())
    config = {**run.require(stage).config.model_dump(mode="json", exclude={"run_dir"}), **changes}
    (folder / "stage.yaml").write_text(yaml.safe_dump(config))
    return folder


def command(stage: str, folder: Path, processes: int, threads: int | None) -> list[str]:
    cli = ["-m", "mlpmem.cli", "-q", stage, "--config", str(folder / "stage.yaml"), "--run-dir", str(folder)]
    cli += ["--threads", str(threads)] if threads else []
    if processes == 1:
        return [sys.executable, *cli]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0", *cli]


def measure(
    run: RunDir, stage: str, processes: int, threads: int | None, work: Path, changes: dict[str, object]
) -> dict[str, float]:
    """Build ``stage`` once with ``processes`` processes of ``threads`` threads (None: the cores shared out); its
    build seconds and the command's wall seconds."""
    folder = scratch(run, stage, work / f"{stage}-{processes}-{time.time_ns()}", changes)
    t0 = time.perf_counter()
    out = subprocess.run(command(stage, folder, processes, threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{stage} with {processes} process(es) failed:\n{out.stderr[-2000:]}")
    manifest = RunDir(folder).require(stage)
    assert manifest.environment.processes == processes
    shutil.rmtree(folder)
    return {"seconds": manifest.timings["seconds"], "wall_seconds": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument(
        "--setups",
        nargs="+",
        default=["1x", "1x1", "Nx"],
        choices=["1x", "1x1", "Nx"],
        help="1x: one process on every core; 1x1: one process, one thread; Nx: N processes",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="change a stage's config from RUN's (a YAML value), e.g. train-memory.epochs=1",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    work = Path(tempfile.mkdtemp(prefix="mp-bench-", dir=args.work_dir))
    results = {}
    known = {"1x": (1, None), "1x1": (1, 1), "Nx": (args.processes, None)}
    setups = {name.replace("N", str(args.processes)): known[name] for name in args.setups}
    for stage in args.stages:
        runs = {name: [] for name in setups}
        for _ in range(args.repeats):
            for name, (p, t) in setups.items():
                changes = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.split(".", 1)[0] == stage}
                runs[name].append(measure(run, stage, p, t, work, changes))
                print(stage, name, runs[name][-1], file=sys.stderr, flush=True)
        med = {
            n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "wall_seconds")} for n, rs in runs.items()
        }
        many = med[f"{args.processes}x"]
        singles = {n: m for n, m in med.items() if n.startswith("1x")}
        results[stage] = {
            "runs": runs,
            "median": med,
            **{f"speedup_vs_{n}": round(m["seconds"] / many["seconds"], 3) for n, m in singles.items()},
            **{f"speedup_wall_vs_{n}": round(m["wall_seconds"] / many["wall_seconds"], 3) for n, m in singles.items()},
        }
        shown = "  ".join(
            f"{n}: {m['seconds']:.1f}s (x{m['seconds'] / many['seconds']:.2f}, wall "
            f"x{m['wall_seconds'] / many['wall_seconds']:.2f})"
            for n, m in singles.items()
        )
        print(f"{stage:<14} {args.processes}x: {many['seconds']:.1f}s  {shown}", flush=True)
        if args.out:  # after every stage: a long run keeps what it measured
            write_report(args, results, overrides)
    shutil.rmtree(work, ignore_errors=True)


def write_report(args: argparse.Namespace, results: dict, overrides: dict) -> None:
    """The measurements so far, with the settings and the machine's load, as JSON (``--out``)."""
    report = {
        "command": " ".join(["python", *sys.argv]),
        "run_dir": str(args.run_dir),
        "processes": args.processes,
        "repeats": args.repeats,
        "changes": overrides,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "stages": results,
        "provenance": Environment.current().model_dump(),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
