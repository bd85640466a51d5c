"""Multi-query associative recall (MQAR) for GPT-2, Gated DeltaNet and MoM at equal parameters: accuracy against the
number of key-value pairs and the sequence length (shared/DESIGN.md §9: recall is MoM's claim).

    python benchmarks/mqar_bench.py --out benchmarks/results/mqar.json --plot docs/mqar.png

Each architecture is trained once, from random init, on a round-robin mixture of every grid cell (sequence length
L, pairs N with 4N <= L; ``mlpmem.bench.mqar`` generates the examples, fresh each step, deterministic by seed) with
the loss on the answer positions only, then scored on held-out examples of each cell (argmax accuracy at the query
positions). Widths are matched: MoM (4 memories, top-2, shared) with SwiGLU width ``--mom-ffn`` sets the parameter
count, and GPT-2 (transformers' GPT2LMHeadModel) and Gated DeltaNet get the FFN width that matches it (printed,
and asserted within 3 %). An architecture already in ``--out`` with the same settings is not trained again, so a
killed run resumes. Timings in the JSON are wall-clock on whatever else the machine was running.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlpmem.artifacts import Environment, atomic_write_json
from mlpmem.bench.mqar import (
    ARCHS,
    IGNORE,
    MQARTask,
    equal_parameter_models,
    mqar_batch,
    num_parameters,
    recall_accuracy,
)
from mlpmem.training import make_optimizer, make_scheduler

EVAL_SEED = 1_000_003  # held-out examples: a seed the training steps never use
EVAL_BATCH = 64


def grid(lengths: list[int], pairs: list[int], vocab_size: int) -> list[MQARTask]:
    return [MQARTask(L, N, vocab_size) for L in lengths for N in pairs if 4 * N <= L]


def loss_on_answers(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions (+ MoM's weighted load-balancing loss)."""
    out = model(input_ids=inputs)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    aux = getattr(out, "aux_loss", None)
    if aux is not None and getattr(model.config, "num_memories", 1) > 1:
        loss = loss + model.config.aux_loss_weight * aux
    return loss


def train(model: torch.nn.Module, tasks: list[MQARTask], args: argparse.Namespace) -> dict:
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, max(1, args.steps // 10), args.steps, 0.1)
    model.train()
    start, recent = time.perf_counter(), []
    for step in range(args.steps):
        batch = mqar_batch(tasks[step % len(tasks)], args.batch_size, seed=args.seed * 1_000_000 + step)
        loss = loss_on_answers(model, batch.inputs, batch.targets)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-len(tasks) :]  # one step of each cell
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1}/{args.steps}  loss {sum(recent) / len(recent):.3f}  {elapsed:.0f} s", flush=True)
    return {"train_seconds": round(time.perf_counter() - start, 1), "final_loss": sum(recent) / len(recent)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tasks: list[MQARTask], examples: int) -> list[dict]:
    model.eval()
    rows = []
    for task in tasks:
        batch = mqar_batch(task, examples, seed=EVAL_SEED)
        correct = scored = 0
        for i in range(0, examples, EVAL_BATCH):
            part = slice(i, i + EVAL_BATCH)
            c, s = recall_accuracy(model(input_ids=batch.inputs[part]).logits, batch.targets[part])
            correct, scored = correct + c, scored + s
        accuracy = correct / scored
        rows.append({"seq_len": task.seq_len, "num_pairs": task.num_pairs, "accuracy": accuracy, "scored": scored})
    return rows


def ffn_width(model: torch.nn.Module) -> int:
    return getattr(model.config, "n_inner", None) or model.config.intermediate_size


def format_table(report: dict) -> str:
    """Markdown: one row per architecture, one column per cell (accuracy)."""
    first = next(iter(report["archs"].values()))["results"]
    cols = [f"L{r['seq_len']} N{r['num_pairs']}" for r in first]
    lines = ["| model | params | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for arch, entry in report["archs"].items():
        accs = " | ".join(f"{r['accuracy']:.3f}" for r in entry["results"])
        lines.append(f"| {arch} | {entry['params']} | {accs} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for e in report["archs"].values() for r in e["results"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.4), sharey=True, squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for arch, entry in report["archs"].items():
            rows = [r for r in entry["results"] if r["seq_len"] == L]
            ax.plot([r["num_pairs"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=arch)
        ax.set_xscale("log", base=2)
        ax.set_title(f"sequence length {L}")
        ax.set_xlabel("key-value pairs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall accuracy")
    axes[0][0].set_ylim(0, 1.02)
    axes[0][-1].legend()
    params = ", ".join(f"{a} {e['params'] / 1e3:.0f}k" for a, e in report["archs"].items())
    fig.suptitle(f"MQAR at equal parameters ({params})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--lengths", nargs="+", type=int, default=[64], help="sequence lengths (tokens)")
    p.add_argument("--pairs", nargs="+", type=int, default=[4, 8, 16], help="key-value pairs (cells 4N <= L)")
    p.add_argument("--vocab-size", type=int, default=64, help="keys from the lower half, values the upper")
    p.add_argument("--width", type=int, default=64, help="model width (all three)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2, help="attention heads / memory heads (width // heads each)")
    p.add_argument("--mom-ffn", type=int, default=64, help="MoM's SwiGLU width; the others are matched to MoM")
    p.add_argument("--steps", type=int, default=600, help="training steps per architecture")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-examples", type=int, default=128, help="held-out examples per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mqar.json"))
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy plot (PNG) here")
    return p.parse_args(argv)


def finished(out: Path, settings: dict) -> dict:
    """The architectures already in ``out`` with the same settings (kept, also those another run of the script
    wrote meanwhile, so runs of one architecture each can share the file)."""
    if not out.exists():
        return {}
    previous = json.loads(out.read_text())
    return previous["archs"] if previous.get("settings") == settings else {}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = grid(args.lengths, args.pairs, args.vocab_size)
    if not tasks:
        raise SystemExit("--pairs: no cell with 4 * pairs <= length")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings = {k: v for k, v in settings.items() if k not in ("archs", "out", "plot", "log_every", "threads")}
    report = {"settings": settings, "environment": Environment.current().model_dump(), "archs": {}}
    report["archs"] = finished(args.out, settings)
    torch.manual_seed(args.seed)
    models = equal_parameter_models(
        args.vocab_size, args.width, args.layers, args.heads, args.mom_ffn, max(t.seq_len for t in tasks)
    )
    counts = {arch: num_parameters(m) for arch, m in models.items()}
    print("parameters: " + ", ".join(f"{a} {n} (ffn {ffn_width(models[a])})" for a, n in counts.items()))
    assert max(counts.values()) <= 1.03 * min(counts.values()), counts
    for arch in args.archs:
        if arch in report["archs"]:
            print(f"{arch}: already in {args.out}")
            continue
        print(f"{arch}: training {args.steps} steps on {len(tasks)} cells", flush=True)
        torch.manual_seed(args.seed)
        model = models[arch]
        entry = {"params": counts[arch], "ffn": ffn_width(model), **train(model, tasks, args)}
        entry["results"] = evaluate(model, tasks, args.eval_examples)
        report["archs"] = {**finished(args.out, settings), **report["archs"], arch: entry}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, report)
    report["archs"] = {a: report["archs"][a] for a in ARCHS if a in report["archs"]}
    atomic_write_json(args.out, report)
    print(format_table(report))
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.out} and {args.plot}")
    return report


if __name__ == "__main__":
    main()
