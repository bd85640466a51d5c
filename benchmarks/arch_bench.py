"""Decode speed and state size of GPT-2, Gated DeltaNet and MoM, each with and without the MLP memory: ms per decoded
token at batch 1 with the cache, the bytes of the cache (a transformer's KV cache grows with the context, a
recurrent state does not) and the process's peak RSS, at several context lengths.

    python benchmarks/arch_bench.py --run-dir gpt2=runs/wt2 --run-dir mom=runs/wt2-mom \
        --run-dir gated-deltanet=runs/wt2-gdn --out benchmarks/results/wt2-arch-bench.json
    python benchmarks/arch_bench.py --run-dir gpt2=runs/wt2 --preset mom=wt2-mom   # MoM at the preset's sizes
    python benchmarks/arch_bench.py --contexts 128 --new-tokens 8 --out /tmp/arch-bench.json   # random init, smoke

An architecture given a run directory (``ARCH=RUN``) is the run's trained LM (its ``train-lm`` model), and is also
timed with the run's MLP memory when the run has a complete ``train-memory`` stage (the joint model of
``mlpmem.inference.joint``, the memory's tuned or default λ). An architecture without one is a random-init model
of ``--layers/--width/--heads/--vocab-size`` (the MoM and Gated DeltaNet FFN widths matched to GPT-2's parameter
count unless given), or with ``ARCH=PRESET`` of a pipeline preset's ``train_lm`` sizes (decode speed and state size
depend on the shape only). A GPT-2 whose ``n_positions`` is shorter than a context plus the new tokens is
timed as a random-init copy of the same shape with enough positions (marked ``timing_model`` in the JSON; speed and
cache size depend on the shape only; with the memory, the run's memory reads the copy's keys). Each (architecture,
memory, context) runs in a fresh process, so its peak RSS is its own; the decode time is the median over
``--new-tokens`` greedy steps of one ``generate`` after a warm-up. Timings are wall-clock: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCHS = ("gpt2", "gated-deltanet", "mom")


# the model of one measurement (built inside the measuring process) ------------------------------------------
def random_model(arch: str, args: dict[str, Any], max_len: int) -> torch.nn.Module:
    from mlpmem.bench.mqar import build_model, matched_ffn

    sizes = dict(vocab_size=args["vocab_size"], width=args["width"], layers=args["layers"], heads=args["heads"])
    ffn = {"gpt2": args["gpt2_ffn"], "mom": args["mom_ffn"], "gated-deltanet": args["gdn_ffn"]}[arch]
    if ffn is None and arch != "gpt2":
        gpt2 = build_model("gpt2", ffn=args["gpt2_ffn"] or 4 * args["width"], max_len=max_len, **sizes)
        ffn = matched_ffn(arch, sum(p.numel() for p in gpt2.parameters()), max_len=max_len, **sizes)
    return build_model(arch, ffn=ffn or 4 * args["width"], max_len=max_len, **sizes)


def preset_model(arch: str, preset: str, vocab_size: int, max_len: int) -> torch.nn.Module:
    """A random-init LM of the sizes a pipeline preset's ``train_lm`` section gives ``arch`` (context >= max_len)."""
    from mlpmem.config import TrainLMConfig
    from mlpmem.lm.train import ARCHITECTURES
    from mlpmem.presets import load_pipeline

    section = {**load_pipeline(preset).get("train_lm", {}), "arch": arch}
    config = TrainLMConfig(**{**section, "context": max(max_len, section.get("context", 0))})
    return ARCHITECTURES[arch](config, vocab_size)


def long_copy(config: Any, needed: int) -> tuple[torch.nn.Module, str] | None:
    """A random-init GPT-2 of ``config``'s shape with ``needed`` positions when it has fewer, else None."""
    n_positions = getattr(config, "n_positions", None)
    if n_positions is None or n_positions >= needed:
        return None
    from transformers import GPT2LMHeadModel

    config = config.__class__.from_dict({**config.to_dict(), "n_positions": needed})
    return GPT2LMHeadModel(config).eval(), f"random-init copy with n_positions={needed} (trained: {n_positions})"


def build(arch: str, run_dir: str | None, with_memory: bool, args: dict[str, Any], needed: int):
    """(model to generate with, its base LM, what was timed)."""
    if run_dir is None:
        preset = args["presets"].get(arch)
        if preset is not None:
            lm = preset_model(arch, preset, args["vocab_size"], needed).eval()
            return lm, lm, f"random init, sizes of preset {preset}"
        lm = random_model(arch, args, needed).eval()
        return lm, lm, "random init"
    from transformers import AutoConfig

    from mlpmem.artifacts import RunDir
    from mlpmem.inference.generation import joint_model_from_run
    from mlpmem.inference.joint import MemoryAugmentedForCausalLM
    from mlpmem.lm.load import load_lm, run_lm_dir
    from mlpmem.memory.model import check_pairing, load_memory

    lm_dir = run_lm_dir(Path(run_dir))
    copy = long_copy(AutoConfig.from_pretrained(lm_dir), needed)
    if copy is None:  # the trained LM itself
        if with_memory:
            joint = joint_model_from_run(run_dir, use_memory=True)
            return joint.eval(), joint.lm, "trained"
        lm = load_lm(lm_dir, "cpu").eval()
        return lm, lm, "trained"
    lm, timing_model = copy
    if not with_memory:
        return lm, lm, timing_model
    memory = load_memory(run_dir, "cpu")  # the run's memory on the longer copy, at the same key layer
    layer = check_pairing(memory.config, lm, RunDir(run_dir).require("train-lm").model_fingerprint)
    joint = MemoryAugmentedForCausalLM.from_parts(lm, memory, memory.config.lmbda or 0.25, memory_layer=layer)
    return joint, lm, timing_model


# measuring ----------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cache_bytes(cache: Any) -> int:
    """Bytes of every distinct tensor reachable from a cache object (KV cache layers, recurrent states)."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, torch.dtype, torch.device)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
    return total


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One (arch, memory, context) in this process: cache bytes after the prompt, decode ms/token, RSS."""
    from mlpmem.hf_cache import cache_of
    from mlpmem.measure import decode_step_seconds

    torch.set_num_threads(job["threads"])
    ctx, new = job["context"], job["new_tokens"]
    model, lm, timing_model = build(job["arch"], job["run_dir"], job["memory"], job["args"], ctx + new + 8)
    rss_loaded = rss_bytes()
    prompt = torch.randint(0, lm.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = cache_bytes(cache_of(lm(input_ids=prompt, use_cache=True)))
        decode_step_seconds(model.generate, prompt[:, :16], 4)  # warm-up
        t0 = time.perf_counter()
        steps = decode_step_seconds(model.generate, prompt, new) * 1e3  # [new - 1] ms
    return {
        "arch": job["arch"],
        "memory": job["memory"],
        "context": ctx,
        "decode_ms_median": round(float(np.median(steps)), 3),
        "decode_ms_p10_p90": [round(float(np.percentile(steps, q)), 3) for q in (10, 90)],
        "cache_bytes": state,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "params": sum(p.numel() for p in model.parameters()),
        "timing_model": timing_model,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def in_fresh_process(job: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, job).result()


# the command ----------------------------------------------------------------------------------------------------
def parse_pairs(items: list[str], flag: str, what: str) -> dict[str, str]:
    """{arch: value} from ``ARCH=VALUE`` items."""
    out = {}
    for item in items:
        arch, _, value = item.partition("=")
        if arch not in ARCHS or not value:
            raise SystemExit(f"{flag}: expected ARCH={what} with ARCH one of {', '.join(ARCHS)}, got {item!r}")
        out[arch] = value
    return out


def parse_run_dirs(items: list[str]) -> dict[str, str]:
    out = parse_pairs(items, "--run-dir", "RUN")
    for path in out.values():
        if not Path(path).is_dir():
            raise SystemExit(f"--run-dir: no such directory: {path}")
    return out


def has_memory(run_dir: str) -> bool:
    from mlpmem.artifacts import RunDir

    return RunDir(run_dir).complete("train-memory") is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", action="append", default=[], metavar="ARCH=RUN", help="a trained LM (and memory)")
    p.add_argument(
        "--preset", action="append", default=[], metavar="ARCH=PRESET",
        help="an architecture without a run: random init at the sizes of a pipeline preset's train_lm section",
    )  # fmt: skip
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 1024, 4096], help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens timed per measurement")
    p.add_argument("--vocab-size", type=int, default=8192, help="random-init models only (as the next four)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--gpt2-ffn", type=int, default=None, help="GPT-2 n_inner (default 4 * width)")
    p.add_argument("--mom-ffn", type=int, default=None, help="MoM SwiGLU width (default: matched to GPT-2)")
    p.add_argument("--gdn-ffn", type=int, default=None, help="Gated DeltaNet SwiGLU width (default: matched)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/arch-bench.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mlpmem.bench.report import write_json_report

    args = parse_args(argv)
    run_dirs = parse_run_dirs(args.run_dir)
    sizes = {k: getattr(args, k) for k in ("vocab_size", "layers", "width", "heads", "gpt2_ffn", "mom_ffn", "gdn_ffn")}
    sizes["presets"] = parse_pairs(args.preset, "--preset", "PRESET")
    jobs = [
        {"arch": arch, "run_dir": run_dirs.get(arch), "memory": memory, "context": ctx, "args": sizes,
         "new_tokens": args.new_tokens, "threads": args.threads}
        for arch in args.archs
        for memory in ((False, True) if arch in run_dirs and has_memory(run_dirs[arch]) else (False,))
        for ctx in args.contexts
    ]  # fmt: skip
    results = []
    for job in jobs:
        row = in_fresh_process(job)
        print(
            f"{row['arch']:>15} memory={str(row['memory']):<5} context {row['context']:>5}: "
            f"{row['decode_ms_median']:8.2f} ms/token  cache {row['cache_bytes'] / 2**20:8.2f} MiB  "
            f"peak RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB  ({row['timing_model']})",
            flush=True,
        )
        results.append(row)
    settings = {**vars(args), "out": str(args.out), "run_dir": run_dirs, "preset": sizes["presets"]}
    return write_json_report(args.out, settings, results)


if __name__ == "__main__":
    main()
