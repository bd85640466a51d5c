"""Training speed of base-LM architectures side by side: tokens per second of `mlpmem train-lm`'s step (forward,
backward, AdamW update) for each architecture at the sizes of a pipeline preset, in one run on one machine.

    python benchmarks/train_speed_bench.py --preset gpt2=wt2 --preset gated-deltanet=wt2-gated-deltanet \
        --preset mom=wt2-mom --out benchmarks/results/wt2-train-speed.json
    python benchmarks/train_speed_bench.py --preset gpt2=wt2 --preset mom=wt2-mom --dtype float32   # the fp32 path

Each architecture runs in a fresh process: a random-init model of the preset's ``train_lm`` sizes (speed depends on
the shape only) trained on random windows of the preset's batch size and context, with the stage's own loss
(``window_loss``, MoM's load-balancing term included), optimizer and autocast dtype. The figure is the median over
``--steps`` timed steps after ``--warmup`` untimed ones. Timings are wall-clock: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arch_bench import parse_pairs  # the sibling script (its folder is on the path when this one runs)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of one training step of ``job["arch"]`` at ``job["preset"]``'s sizes, in this process."""
    from mlpmem.config import TrainLMConfig
    from mlpmem.devices import autocast, resolve_dtype
    from mlpmem.lm.train import ARCHITECTURES, random_windows, window_loss
    from mlpmem.presets import load_pipeline
    from mlpmem.training import make_optimizer

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    config = TrainLMConfig(**{**load_pipeline(job["preset"]).get("train_lm", {}), "arch": job["arch"]})
    model = ARCHITECTURES[job["arch"]](config, job["vocab_size"]).train()
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    device = torch.device("cpu")
    dtype = resolve_dtype(job["dtype"], device)
    corpus = np.random.default_rng(0).integers(0, job["vocab_size"], 200_000, dtype=np.int64)
    rng = np.random.default_rng(1)
    seconds = []
    for step in range(job["warmup"] + job["steps"]):
        x = random_windows(corpus, config.context, config.batch_size, rng)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = window_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= job["warmup"]:
            seconds.append(time.perf_counter() - t0)
    tokens = config.batch_size * config.context
    median = float(np.median(seconds))
    return {
        "arch": job["arch"],
        "preset": job["preset"],
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens,
        "step_seconds_median": round(median, 4),
        "step_seconds_min_max": [round(min(seconds), 4), round(max(seconds), 4)],
        "tokens_per_s": round(tokens / median, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--preset", action="append", required=True, metavar="ARCH=PRESET",
        help="an architecture and the pipeline preset whose train_lm section sizes it (repeat for each)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed steps per architecture")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="as train-lm --dtype")
    p.add_argument("--vocab-size", type=int, default=8192, help="the wt2 tokenizer's size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/train-speed.json"))
    args = p.parse_args(argv)
    args.presets = parse_pairs(args.preset, "--preset", "PRESET")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mlpmem.bench.report import write_json_report

    args = parse_args(argv)
    results = []
    for arch, preset in args.presets.items():
        job = {"arch": arch, "preset": preset, **{k: getattr(args, k) for k in ("steps", "warmup", "dtype", "threads")}}
        job["vocab_size"] = args.vocab_size
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(measure, job).result()
        results.append(row)
        print(
            f"{arch:>15} ({preset}, {row['parameters'] / 1e6:.2f}M, {row['dtype']}): "
            f"{row['tokens_per_s']:9,.0f} tokens/s  (step {row['step_seconds_median'] * 1e3:.0f} ms median)",
            flush=True,
        )
    first = results[0]
    for row in results[1:]:
        print(f"{row['arch']} / {first['arch']} tokens/s: {row['tokens_per_s'] / first['tokens_per_s']:.2f}")
    settings = {**{k: v for k, v in vars(args).items() if k != "preset"}, "out": str(args.out)}
    return write_json_report(args.out, settings, results)


if __name__ == "__main__":
    main()
