"""The end-of-pipeline summary: results table, sizes and stage times of a run directory."""

from __future__ import annotations

from pathlib import Path

from mlpmem.artifacts import MANIFEST, read_json
from mlpmem.evaluate.report import format_table

STAGE_ORDER = ("prepare", "lm", "datastore", "index", "targets", "memory", "evaluate")


def print_run_summary(run_dir: Path, wall_times: dict[str, float]) -> None:
    """Print the evaluation table, then each stage's status, size and time."""
    run_dir = Path(run_dir)
    results = run_dir / "evaluate" / "results.json"
    if results.exists():
        data = read_json(results)
        print(f"\nPerplexity ({data['tokens']} tokens; λ and T tuned on {data['tuned_on']}):")
        print(format_table(data["systems"]))
    print(f"\n{'stage':<10} {'status':<9} {'built in':>9} {'this run':>9}  counts")
    for stage in STAGE_ORDER:
        path = run_dir / stage / MANIFEST
        if not path.exists():
            continue
        m = read_json(path)
        built = m.get("timings", {}).get("seconds")
        cli_name = {"lm": "train-lm", "memory": "train-memory"}.get(stage, stage)
        now = wall_times.get(cli_name)
        counts = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in m.get("counts", {}).items())
        print(f"{stage:<10} {m.get('status', '?'):<9} {f'{built:.0f}s' if built else '-':>9} {f'{now:.1f}s' if now is not None else '-':>9}  {counts}")
