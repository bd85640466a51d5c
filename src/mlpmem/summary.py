"""The end-of-pipeline summary (results table, then each stage's status, counts and times) and ``mlpmem verify``."""

from __future__ import annotations

from pathlib import Path

from mlpmem.artifacts import RunDir
from mlpmem.errors import UsageError
from mlpmem.stages import BUILD_STAGES


def _fmt(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def print_run_summary(run_dir: Path, wall_times: dict[str, float], reused: set[str] = frozenset()) -> None:
    """Print the evaluation table, then each stage's status, what it holds and how long it took."""
    from mlpmem.evaluate.report import format_results

    run = RunDir(run_dir)
    evaluate = run.read("evaluate")
    if evaluate is not None and evaluate.complete:
        print("\n" + format_results(evaluate))
    recall = run.read("recall")
    if recall is not None and recall.complete:
        from mlpmem.evaluate.recall import format_recall

        print("\n" + format_recall(recall))
    print(f"\n{'stage':<13} {'status':<9} {'built in':>9} {'this run':>9}  counts")
    for stage in BUILD_STAGES:
        manifest = run.read(stage)
        if manifest is None:
            continue
        built = manifest.timings.get("seconds")
        now = wall_times.get(stage)
        now_text = "reused" if stage in reused else (f"{now:.1f}s" if now is not None else "-")
        counts = (
            ", ".join(f"{k}={_fmt(v)}" for k, v in manifest.summary().items() if v is not None)
            if manifest.complete
            else ""
        )
        if manifest.disk_bytes is not None:
            counts += f"{', ' if counts else ''}disk={manifest.disk_bytes / 1e6:,.1f} MB"
        timings = manifest.timings
        attempts = int(timings.get("attempts", 1))
        if attempts > 1:  # built in: the last attempt only
            counts += f", attempts={attempts} ({timings.get('since_first_start', 0):.0f}s since the first)"
        print(f"{stage:<13} {manifest.status:<9} {f'{built:.0f}s' if built else '-':>9} {now_text:>9}  {counts}")


def verify(run_dir: Path) -> list[str]:
    """Check every stage of a run: manifest checksum and schema, each file's size and content hash, array sizes
    against shapes, and that each stage was built from the current version of its inputs. Returns the problems.

    It holds the run's lock (a command building in the run is waited for by refusing now, not raced) and writes
    nothing: a swap a kill interrupted is reported, for the next building command to finish."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UsageError(f"run directory {run.path} does not exist")
    with run.lock("mlpmem verify", read_only=True):
        return verify_stages(run)


def verify_stages(run: RunDir) -> list[str]:
    problems, found = [], 0
    for stage in BUILD_STAGES:
        if not any(p.exists() for p in (run.folder(stage), run.partial_folder(stage), run.aside_folder(stage))):
            continue
        found += 1
        if run.folder(stage).exists() or run.aside_folder(stage).exists():
            problems += verify_stage(run, stage)
        if run.partial_folder(stage).exists():
            print(
                f"{stage:<13} note     an unfinished build in {run.partial_folder(stage)} "
                "(rerun the stage to resume it; a complete one is swapped in by the next command on the run)"
            )
    if not found:
        raise UsageError(f"{run.path} holds no stage folders")
    return problems


def verify_stage(run: RunDir, stage: str) -> list[str]:
    """Check one finished stage in full; prints its line, returns its problem (or none)."""
    try:
        manifest = run.read(stage)
        if manifest is None:
            raise UsageError(f"{run.folder(stage)} has no manifest")
        if not manifest.complete:
            raise UsageError(f"{run.folder(stage)} is not complete (status {manifest.status})")
        run.check_files(stage, manifest, hashes="all")
        for name in manifest.arrays:
            run.array(stage, name, manifest)
        run.check_not_stale(stage, manifest)
    except UsageError as err:
        print(f"{stage:<13} PROBLEM  {err}")
        return [str(err)]
    print(f"{stage:<13} ok       {len(manifest.files)} files, {sum(r.bytes for r in manifest.files.values()):,} bytes")
    return []
