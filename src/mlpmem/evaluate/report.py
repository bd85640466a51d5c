"""Results table (printed, and JSON for users) and the validation-PPL-against-λ plot.

``print_results`` is what ``mlpmem evaluate`` prints; ``format_results`` is the same table for the end-of-run
summary. Both read the typed evaluate manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpmem.manifests import EvaluateManifest, SystemResult
from mlpmem.memory_system import SystemName


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


EDGE_MARK = "^"  # a tuned value on an edge of its search
OVERLAP_MARK = "!"  # a perplexity on the split the datastore / memory were built from


def format_table(systems: list[SystemResult], overlap: str | None = None) -> str:
    """A fixed-width table: system, valid PPL, test PPL, λ (per component for combined systems), T; edge optima
    marked ``^``, perplexities on the split the datastore was built from marked ``!``."""
    rows = [f"{'system':<20} {'valid PPL':>11} {'test PPL':>11} {'lambda':>13} {'T':>7}"]
    for s in systems:
        lmbda_text = "+".join(f"{v:g}" for v in s.weights.values()) if s.weights else _fmt(s.lmbda, "g")
        marks = {
            split: OVERLAP_MARK if split == overlap and s.name != SystemName.BASE else " "
            for split in ("valid", "test")
        }
        edge = {name: EDGE_MARK if name in s.edges else " " for name in ("lambda", "T")}
        rows.append(
            f"{s.name:<20} {_fmt(s.valid_ppl, '.2f'):>10}{marks['valid']} {_fmt(s.test_ppl, '.2f'):>10}{marks['test']} "
            f"{lmbda_text:>12}{edge['lambda']} {_fmt(s.temperature, 'g'):>6}{edge['T']}"
        )
    return "\n".join(rows)


def notes(manifest: EvaluateManifest) -> list[str]:
    """The footnotes a table needs: tuned on test, overlap with the datastore, edge optima."""
    lines = []
    if manifest.tuned_on == "test" and "test" in manifest.tokens:
        lines.append("test PPL is NOT held out: λ and T were tuned on test (--tune-on test)")
    if manifest.overlap:
        lines.append(
            f"{OVERLAP_MARK} scored on {manifest.overlap}, the split the datastore and memory were built from "
            "(--allow-overlap): recall, not held-out perplexity"
        )
    if any(s.edges for s in manifest.systems):
        lines.append(
            f"{EDGE_MARK} optimum on an edge of its search: λ at 0 or its top (1; 0.99 for kNN-LM), the grid "
            "extended up to there, or T at an end of --knn-temperatures (widen that grid)"
        )
    return lines


def format_results(manifest: EvaluateManifest) -> str:
    """The heading (tokens scored per split, the split λ and T were tuned on), the table and its footnotes."""
    tokens = ", ".join(f"{split} {n:,}" for split, n in manifest.tokens.items())
    tuned = f"; λ and T tuned on {manifest.tuned_on}" if manifest.tuned_on else ""
    table = format_table(manifest.systems, manifest.overlap)
    return "\n".join([f"Perplexity ({tokens} tokens{tuned}):", table, *notes(manifest)])


def print_results(manifest: EvaluateManifest, config: Any = None) -> None:
    """``mlpmem evaluate``'s terminal output: the table and where the results were written."""
    print(format_results(manifest))
    if config is not None:
        print(f"results: {Path(config.run_dir) / 'evaluate' / 'results.json'}")


def plot_lambda_curves(curves: dict[str, dict[float, float]], base_ppl: float, path: Path) -> None:
    """Validation PPL against λ, one line per system, the base LM as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=name)
    ax.axhline(base_ppl, color="gray", linestyle="--", label=SystemName.BASE)
    ax.set_xlabel("λ (weight of the memory / retrieval)")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
