"""Results table (printed, and JSON for users) and the validation-PPL-against-λ plot.

``print_results`` is what ``mlpmem evaluate`` prints; ``format_results`` is the same table for the end-of-run
summary. Both read the typed evaluate manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpmem.manifests import EvaluateManifest, SystemResult


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(systems: list[SystemResult]) -> str:
    """A fixed-width table: system, valid PPL, test PPL, λ (per component for combined systems), T."""
    rows = [f"{'system':<20} {'valid PPL':>10} {'test PPL':>10} {'lambda':>12} {'T':>6}"]
    for s in systems:
        lmbda_text = "+".join(f"{v:g}" for v in s.weights.values()) if s.weights else _fmt(s.lmbda, "g")
        rows.append(
            f"{s.name:<20} {_fmt(s.valid_ppl, '.2f'):>10} {_fmt(s.test_ppl, '.2f'):>10} "
            f"{lmbda_text:>12} {_fmt(s.temperature, 'g'):>6}"
        )
    return "\n".join(rows)


def format_results(manifest: EvaluateManifest) -> str:
    """The heading (tokens scored per split, the split λ and T were tuned on) and the table."""
    tokens = ", ".join(f"{split} {n:,}" for split, n in manifest.tokens.items())
    return f"Perplexity ({tokens} tokens; λ and T tuned on {manifest.tuned_on}):\n{format_table(manifest.systems)}"


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
    ax.axhline(base_ppl, color="gray", linestyle="--", label="base")
    ax.set_xlabel("λ (weight of the memory / retrieval)")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
