"""The benchmark's printed report (table with ratios to base, summary lines) and its plot (latency and bytes
against datastore size). ``print_report`` is what ``mlpmem bench`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpmem.measure import human_bytes, human_count
from mlpmem.memory_system import SystemName
from mlpmem.systems import SYSTEMS


def output_dir(config: Any) -> Path:
    """Where bench.json and bench.png go: ``--out-dir``, else RUN_DIR/bench."""
    return Path(config.out_dir) if config.out_dir else Path(config.run_dir) / "bench"


def write_json_report(path: Path, settings: dict[str, Any], results: list[dict]) -> dict[str, Any]:
    """A benchmark script's JSON: its settings, the machine it ran on and its result rows (written atomically)."""
    from mlpmem.artifacts import Environment, atomic_write_json

    report = {"settings": settings, "environment": Environment.current().model_dump(), "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    print(f"wrote {path}")
    return report


def format_table(results: list[dict], base_ms: float, base_tps: float) -> str:
    """One row per system (and datastore size): ms/token (median, and min-max over rounds), tokens/s, bytes, with
    ratios to base; a ratio whose timings spread too much is marked ``~``."""
    head = (
        f"{'system':<26} {'datastore':>10} {'ms/token':>9} {'min-max':>13} {'x base':>7} {'tokens/s':>10} "
        f"{'x base':>7} {'bytes':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        size = human_count(r["datastore_size"]) + ("*" if r["synthetic"] else "") if r["datastore_size"] else "-"
        ms, tps = r["ms_per_token"], r["tokens_per_s"]
        low, _, high = r.get("ms_spread") or (ms, ms, ms)
        ratio = f"{'~' if r.get('noisy') else ''}{ms / base_ms:.2f}"
        lines.append(
            f"{r['system']:<26} {size:>10} {ms:>9.2f} {f'{low:.2f}-{high:.2f}':>13} {ratio:>7} "
            f"{(f'{tps:,.0f}' if tps else '-'):>10} {(f'{tps / base_tps:.2f}' if tps else '-'):>7} "
            f"{human_bytes(r['bytes']):>9}"
        )
    lines.append(
        "* synthetic store (random keys of the real width). bytes: model weights for base and "
        "decoder-equal-params; added weights for mlp-memory; datastore + index on disk for knn-lm. "
        "min-max: the rounds' medians"
    )
    if any(r.get("noisy") for r in results):
        lines.append("~ the rounds spread too much for this ratio to mean anything (machine load): rerun when idle")
    return "\n".join(lines)


def ms_text(value: float | None) -> str:
    """An added cost in ms, or '<noise' when it is not above the spread of the timings (never negative)."""
    return "<noise" if value is None else f"{value:.3f}"


def plot(results: list[dict], memory_bytes: int, path: Path) -> None:
    """Two panels against datastore size (log-log): decode ms/token of kNN-LM vs the flat lines of the
    size-independent systems; and bytes of datastore + index vs the memory's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knn = sorted((r for r in results if r["system"] == SystemName.KNN_LM), key=lambda r: r["datastore_size"])
    flat = [r for r in results if r["datastore_size"] is None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    synthetic = [r for r in knn if r["synthetic"]]
    if synthetic:
        sizes = [r["datastore_size"] for r in synthetic]
        label = f"knn-lm, synthetic IVF-PQ (k={synthetic[0]['k']}, nprobe={synthetic[0]['nprobe']})"
        ax1.plot(sizes, [r["ms_per_token"] for r in synthetic], "o-", color="C3", label=label)
        ax2.plot(sizes, [r["bytes"] for r in synthetic], "o-", color="C3", label="datastore + index (synthetic)")
    for r in (r for r in knn if not r["synthetic"]):
        label = f"knn-lm, the run's datastore ({r['index']})"
        ax1.plot([r["datastore_size"]], [r["ms_per_token"]], "s", color="black", label=label)
        ax2.plot(
            [r["datastore_size"]], [r["bytes"]], "s", color="black", label=f"the run's datastore + index ({r['index']})"
        )
    ax2.axhline(memory_bytes, color="C0", label="MLP memory (float32)")
    colors = ["gray", "C0", "C2", "C1", "C4", "C5", "C6"]  # C3 is kNN-LM's
    for i, r in enumerate(flat):
        ax1.axhline(
            r["ms_per_token"], color=colors[i % len(colors)], linestyle=":" if i == 0 else "--", label=r["system"]
        )
    for ax, ylabel in ((ax1, "decode ms / token (batch 1)"), (ax2, "bytes")):
        ax.set_xscale("log")
        ax.set_xlabel("datastore entries")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_lines(report: dict) -> str:
    """The ratios that matter, one per line: memory vs base and decoder, mixing overhead, kNN-LM, storage, crossover."""
    s, m = report["summary"], report["models"]
    mix = s["mixing_overhead"]
    lines = [
        f"memory: {m['memory_params']:,} params ({'trained' if m['memory_trained'] else 'random init'}); "
        f"base {m['base_params']:,}; "
        f"decoder-equal-params {m['decoder_equal_params']:,} ({m['decoder_equal_layers']} layers)",
        "memory per-token ms (batch 1) alone, hot cache / added to a decode step: "
        + ", ".join(
            f"{v['variant']} {v['ms_per_token']:.3f} / {ms_text(v.get('decode_ms_added'))}"
            + (f" (KL {v['mean_kl']})" if v.get("mean_kl") is not None and v["variant"] != "eager" else "")
            for v in report["memory_variants"]
            if v["ms_per_token"] is not None
        ),
        f"mlp-memory / base: {s['memory_over_base']}x; "
        f"decoder-equal-params / mlp-memory: {s['decoder_equal_over_memory']}x"
        + (
            f" (/ best memory: {s['decoder_equal_over_best_memory']}x)" if "decoder_equal_over_best_memory" in s else ""
        ),
        f"hooks + mixing: {mix['in_hook_ms']:.3f} ms = {100 * mix['share_of_memory_step']:.1f}% "
        f"of a memory decode step (step difference with a free memory: {ms_text(mix['step_difference_ms'])} ms)",
        "kNN-LM / memory decode: "
        + ", ".join(f"{k}: {v}x" for k, v in s["knn_over_memory"].items())
        + (
            " (/ best memory: " + ", ".join(f"{k}: {v}x" for k, v in s["knn_over_best_memory"].items()) + ")"
            if s["memory_speedup"]["best"]
            else ""
        ),
        "storage (datastore + index) / memory: " + ", ".join(f"{k}: {v}x" for k, v in s["storage_over_memory"].items()),
        f"crossover: {s['crossover']['size'] or '-'} ({s['crossover']['note']})",
    ]
    if "targets" in s:
        t, long = s["targets"], report["long_context"]
        lines.append(
            f"targets (memory {long['memory_dtype']}): int8 KL to fp32 on valid keys {t['int8_kl_to_fp32_valid_keys']}"
            f" (<= 1e-3); memory adds {t['memory_added_over_base_step']}x the base step (<= 0.5); "
            f"decoder-equal-params / (base + memory) at context {long['context']}: "
            f"{t['decoder_equal_over_memory_at_long_context']}x (>= 1.3)"
        )
    if s.get("noisy"):
        lines.append(f"NOISY TIMINGS ({', '.join(s['noisy'])}): {s['noise_note']}")
    return "\n".join(lines)


def print_report(report: dict, config: Any) -> None:
    """``mlpmem bench``'s terminal output: the table, the summary lines and where the files went."""
    base = next(r for r in report["results"] if r["system"] == SystemName.BASE)
    print(format_table(report["results"], base["ms_per_token"], base["tokens_per_s"]))
    print(summary_lines(report))
    for system in SYSTEMS:
        if system.name in report:
            print("\n".join(system.bench_lines(report[system.name])))
    out = output_dir(config)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
