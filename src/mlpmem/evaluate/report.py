"""Results table (printed and JSON) and the validation-PPL-against-λ plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(systems: list[dict]) -> str:
    """A fixed-width table: system, valid PPL, test PPL, λ, T."""
    rows = [f"{'system':<20} {'valid PPL':>10} {'test PPL':>10} {'lambda':>12} {'T':>6}"]
    for s in systems:
        lmbda = s.get("lambda")
        lmbda_text = "+".join(f"{v:g}" for v in s["weights"].values()) if s.get("weights") else _fmt(lmbda, "g")
        rows.append(
            f"{s['name']:<20} {_fmt(s.get('valid_ppl'), '.2f'):>10} {_fmt(s.get('test_ppl'), '.2f'):>10} "
            f"{lmbda_text:>12} {_fmt(s.get('temperature'), 'g'):>6}"
        )
    return "\n".join(rows)


def plot_lambda_curves(curves: dict[str, dict[float, float]], base_ppl: float, path: Path) -> None:
    """Validation PPL against λ, one line per system, the base LM as a horizontal line."""
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
