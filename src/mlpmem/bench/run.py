"""``mlpmem bench``: decode latency, scoring throughput and storage of base, MLP memory, kNN-LM and a decoder of
equal parameters, measured side by side in one process.

    mlpmem bench --quick --run-dir runs/demo                  # a few minutes on 2 CPU cores
    mlpmem bench --run-dir runs/wt2 --out-dir runs/wt2/bench  # full: synthetic stores up to 50M entries

Systems (batch 1 decode through transformers' generate with the KV cache; median ms over every timed step;
one warm-up, then rounds that visit the systems in turn, so load changes hit all of them alike):
  * ``base``: the run's LM;
  * ``mlp-memory``: base + the run's memory (a random-init one of ``memory_blocks`` blocks when the run has none),
    mixed by the generation hooks; ``mlp-memory+VARIANT``: the same with the fastest faithful speed-up;
  * ``knn-lm``: base + live retrieval at k = 1024, nprobe = 32, p_kNN aggregated over the vocabulary, on the
    run's own datastore and index when it has them and on synthetic IVF-PQ stores of ``datastore_sizes``
    (random keys of the real width, lists ≈ 4·sqrt(N); see ``mlpmem.bench.synthetic``);
  * ``decoder-equal-params``: the base architecture with more layers, so its parameters match base + memory
    (random init: only its speed matters).
Also: batched scoring throughput (log-probs of every token of ``score_batch`` windows), the memory's own
per-token cost eager vs bf16 / int8 / torch.compile, and the overhead of the hooks + mixing (a memory that costs
nothing) as a share of a memory decode step. Writes OUT/bench.json, OUT/bench.png and prints the table.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mlpmem.artifacts import Stage, atomic_write_json, environment, open_array, read_json
from mlpmem.bench.memory_speed import ConstantMemory, parameter_bytes, time_variants
from mlpmem.bench.report import format_table, plot
from mlpmem.bench.synthetic import build_synthetic_index, datastore_bytes, index_file_bytes
from mlpmem.bench.timing import interleaved_decode_ms, interleaved_scoring_tokens_per_s
from mlpmem.config import BenchConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.inference.generation import KnnRetriever, MemoryAugmentedLM
from mlpmem.lm.keys import key_dim, key_module_path
from mlpmem.lm.load import load_lm, max_positions, run_lm_dir

# --quick: what it changes, for fields the user did not set
QUICK = {"datastore_sizes": [10_000, 100_000], "new_tokens": 24, "repeats": 3, "prompt_tokens": 16,
         "score_batch": 4, "score_context": 64}
FAITHFUL_KL = 1e-3  # a speed-up is used end to end only when its mean KL to the eager memory stays below this


def with_quick(config: BenchConfig) -> BenchConfig:
    if not config.quick:
        return config
    return config.model_copy(update={k: v for k, v in QUICK.items() if k not in config.model_fields_set})


def complete(run_dir: Path, stage: str) -> dict | None:
    manifest = Stage(run_dir, stage).read()
    return manifest if manifest and manifest.get("status") == "complete" else None


def load_memory_for(run_dir: Path, lm: PreTrainedModel, config: BenchConfig, device: torch.device) -> tuple[nn.Module, bool]:
    """The run's trained memory (pairing checked), or a random-init one of the configured size; (memory, trained)."""
    from mlpmem.memory.model import MLPMemory, MLPMemoryConfig, check_pairing, load_memory

    if complete(run_dir, "memory"):
        memory = load_memory(run_dir, device)
        check_pairing(memory.config, read_json(run_dir / "lm" / "manifest.json")["model_fingerprint"], memory.config.key_layer)
        return memory, True
    torch.manual_seed(config.seed)
    layer = key_module_path(lm)
    d = key_dim(lm, layer)
    cfg = MLPMemoryConfig(input_dim=d, hidden_size=d, n_blocks=config.memory_blocks, vocab_size=lm.config.vocab_size, key_layer=layer)
    return MLPMemory(cfg).to(device).eval(), False


def decoder_equal_params(lm: PreTrainedModel, target: int, device: torch.device) -> tuple[PreTrainedModel, int]:
    """The base architecture with as many layers as brings its parameters nearest ``target`` (random init)."""
    n_layers = lm.config.num_hidden_layers
    blocks = next(m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers)
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    extra = max(0, round((target - sum(p.numel() for p in lm.parameters())) / per_layer))
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = n_layers + extra
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    return model, n_layers + extra


def plain_generate(model: PreTrainedModel):
    def generate(ids: torch.Tensor, **kwargs: Any):
        with torch.inference_mode():
            return model.generate(ids, **kwargs)
    return generate


def plain_score(model: PreTrainedModel):
    def score(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
    return score


def stores(config: BenchConfig, run_dir: Path, d: int) -> list[dict]:
    """The stores kNN-LM is timed on: the run's own (when complete and of the LM's key width), then synthetic ones."""
    out = []
    ds, ix = complete(run_dir, "datastore"), complete(run_dir, "index")
    if ds and ix and ds.get("key_dim") == d:
        out.append({"size": int(ds["counts"]["entries"]), "synthetic": False})
    out += [{"size": int(n), "synthetic": True} for n in sorted(set(config.datastore_sizes))]
    return out


def open_store(store: dict, config: BenchConfig, run_dir: Path, d: int, vocab: int, work: Path) -> tuple[Any, np.ndarray, int, str]:
    """(index with nprobe set, values [N], bytes of datastore + index, factory)."""
    from mlpmem.knn.index import load_index, set_nprobe

    if not store["synthetic"]:
        index, manifest = load_index(run_dir)
        set_nprobe(index, config.nprobe)
        values = np.asarray(open_array(run_dir, "datastore", "values"))
        files = [run_dir / "datastore" / f"{a}.bin" for a in ("keys", "values")] + [run_dir / "index" / manifest.get("index_file", "index.faiss")]
        return index, values, sum(f.stat().st_size for f in files if f.exists()), manifest.get("factory", "?")
    t0 = time.time()
    index, factory = build_synthetic_index(store["size"], d, config.k, config.nprobe, config.seed)
    path = work / f"synthetic-{store['size']}.faiss"
    size = datastore_bytes(store["size"], d) + index_file_bytes(index, path)
    if not config.keep_indexes:
        path.unlink(missing_ok=True)
    store["build_s"] = round(time.time() - t0, 1)
    values = np.random.default_rng(config.seed).integers(0, vocab, store["size"], dtype=np.int32)
    return index, values, size, factory


def crossover(knn_rows: list[dict], memory_ms: float) -> dict[str, Any]:
    """The datastore size where kNN-LM's decode step becomes slower than the memory's (log-linear interpolation
    over the synthetic stores, which share one index recipe; over all stores when there are none)."""
    rows = sorted([r for r in knn_rows if r["synthetic"]] or knn_rows, key=lambda r: r["datastore_size"])
    if not rows:
        return {"size": None, "note": "no kNN-LM timings"}
    if rows[0]["ms_per_token"] >= memory_ms:
        return {"size": None, "note": f"kNN-LM is slower than the memory at every size measured (from {rows[0]['datastore_size']})"}
    for a, b in zip(rows, rows[1:]):
        if a["ms_per_token"] < memory_ms <= b["ms_per_token"]:
            la, lb = math.log(a["datastore_size"]), math.log(b["datastore_size"])
            t = (memory_ms - a["ms_per_token"]) / (b["ms_per_token"] - a["ms_per_token"])
            return {"size": int(math.exp(la + t * (lb - la))), "note": "interpolated between measured sizes"}
    return {"size": None, "note": f"kNN-LM stays faster than the memory up to {rows[-1]['datastore_size']} entries"}


def bench(config: BenchConfig) -> dict[str, Any]:
    """Run every timing; returns the bench.json dict (also written to OUT_DIR, with bench.png)."""
    import faiss

    config = with_quick(config)
    run_dir = Path(config.run_dir)
    out_dir = Path(config.out_dir) if config.out_dir else run_dir / "bench"
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
        faiss.omp_set_num_threads(config.threads)
    device = resolve_device(config.device)
    started = time.time()

    lm = load_lm(run_lm_dir(run_dir), device)
    lm.generation_config.eos_token_id = None  # every timed generation runs its full length
    memory, trained = load_memory_for(run_dir, lm, config, device)
    layer = key_module_path(lm, getattr(memory.config, "key_layer", None))
    d, vocab = key_dim(lm, layer), int(lm.config.vocab_size)
    positions = max_positions(lm) or 1024
    if config.prompt_tokens + config.new_tokens > positions:
        raise UsageError(f"--prompt-tokens + --new-tokens ({config.prompt_tokens + config.new_tokens}) exceed the LM's {positions} positions")
    g = torch.Generator().manual_seed(config.seed)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=g).to(device)  # [1, P]
    context = min(config.score_context, positions)
    batch = torch.randint(0, vocab, (config.score_batch, context), generator=g).to(device)  # [B, T]

    print(f"bench: memory per-token cost (variants: eager, plain, {', '.join(config.optimisations)})", flush=True)
    variants = time_variants(memory, config.optimisations, d, device)
    faithful = [v for v in variants if v["variant"] != "eager" and v["ms_per_token"] is not None and v["mean_kl"] <= FAITHFUL_KL]
    eager_ms = next(v["ms_per_token"] for v in variants if v["variant"] == "eager")

    base_params = sum(p.numel() for p in lm.parameters())
    memory_params = sum(p.numel() for p in memory.parameters())
    decoder, decoder_layers = decoder_equal_params(lm, base_params + memory_params, device)
    mlm = MemoryAugmentedLM(lm, memory=memory, lmbda=config.lmbda, key_layer=layer)
    decode_systems = {"base": plain_generate(lm), "mlp-memory": mlm.generate}
    score_systems = {"base": plain_score(lm), "mlp-memory": mlm.joint_log_probs}
    for v in faithful:  # in a decode step the memory's weights compete with the LM's for cache: time them there
        fast = MemoryAugmentedLM(lm, memory=v["module"], lmbda=config.lmbda, key_layer=layer)
        decode_systems[f"mlp-memory+{v['variant']}"] = fast.generate
        score_systems[f"mlp-memory+{v['variant']}"] = fast.joint_log_probs
    stub = MemoryAugmentedLM(lm, memory=ConstantMemory(vocab).to(device), lmbda=config.lmbda, key_layer=layer)
    in_hook: list[float] = []  # seconds the mixing hook spends per step with a memory that costs nothing
    stub.mix = timed(stub.mix, in_hook)
    decode_systems["hooks+mixing only"] = stub.generate
    decode_systems["decoder-equal-params"] = plain_generate(decoder)
    score_systems["decoder-equal-params"] = plain_score(decoder)

    print("bench: decode latency and scoring throughput of base, memory, equal-size decoder", flush=True)
    ms = interleaved_decode_ms(decode_systems, prompt, config.new_tokens, config.repeats)
    tps = interleaved_scoring_tokens_per_s(score_systems, batch, config.repeats)
    lm_bytes, memory_bytes = parameter_bytes(lm), parameter_bytes(memory)
    sizes = {"base": lm_bytes, "mlp-memory": memory_bytes, "decoder-equal-params": parameter_bytes(decoder)}
    for v in faithful:
        sizes[f"mlp-memory+{v['variant']}"] = variant_bytes(v)
        v["decode_ms_added"] = round(ms[f"mlp-memory+{v['variant']}"] - ms["base"], 4)
    next(v for v in variants if v["variant"] == "eager")["decode_ms_added"] = round(ms["mlp-memory"] - ms["base"], 4)
    best = min(faithful, key=lambda v: v["decode_ms_added"], default=None)
    best = best if best and ms[f"mlp-memory+{best['variant']}"] < ms["mlp-memory"] else None
    results = [
        {"system": name, "datastore_size": None, "synthetic": False, "ms_per_token": round(ms[name], 4),
         "tokens_per_s": round(tps[name], 1), "bytes": sizes[name]}
        for name in score_systems
    ]
    results[-1]["layers"] = decoder_layers
    results[-1]["params"] = sum(p.numel() for p in decoder.parameters())

    knn_rows = []
    for store in stores(config, run_dir, d):
        label = f"{store['size']:,} entries" + (" (synthetic)" if store["synthetic"] else " (the run's datastore)")
        print(f"bench: kNN-LM on {label}", flush=True)
        index, values, store_bytes, factory = open_store(store, config, run_dir, d, vocab, work)
        retriever = KnnRetriever(index, values, k=min(config.k, int(index.ntotal)), temperature=config.knn_temperature, nprobe=config.nprobe)
        knn = MemoryAugmentedLM(lm, knn=retriever, knn_lmbda=config.lmbda, key_layer=layer)
        block = interleaved_decode_ms({"knn-lm": knn.generate, "mlp-memory": mlm.generate}, prompt, config.new_tokens, config.repeats)
        knn_tps = interleaved_scoring_tokens_per_s({"knn-lm": knn.joint_log_probs}, batch, config.repeats)["knn-lm"]
        row = {"system": "knn-lm", "datastore_size": store["size"], "synthetic": store["synthetic"],
               "ms_per_token": round(block["knn-lm"], 4), "tokens_per_s": round(knn_tps, 1), "bytes": int(store_bytes),
               "index": factory, "k": retriever.k, "nprobe": config.nprobe,
               "memory_ms_same_rounds": round(block["mlp-memory"], 4),
               "knn_over_memory": round(block["knn-lm"] / block["mlp-memory"], 3),
               "knn_over_best_memory": round(block["knn-lm"] / ms[f"mlp-memory+{best['variant']}"], 3) if best else None,
               "storage_over_memory": round(store_bytes / memory_bytes, 2)}
        if "build_s" in store:
            row["build_s"] = store["build_s"]
        knn_rows.append(row)
        del index, values, retriever, knn

    overhead_ms = ms["hooks+mixing only"] - ms["base"]
    in_hook_ms = float(np.median(in_hook) * 1e3)
    summary = {
        "memory_over_base": round(ms["mlp-memory"] / ms["base"], 3),
        "decoder_equal_over_memory": round(ms["decoder-equal-params"] / ms["mlp-memory"], 3),
        "crossover": crossover(knn_rows, ms["mlp-memory"]),
        "crossover_best_memory": crossover(knn_rows, ms[f"mlp-memory+{best['variant']}"]) if best else None,
        "knn_over_memory": {str(r["datastore_size"]): r["knn_over_memory"] for r in knn_rows},
        "knn_over_best_memory": {str(r["datastore_size"]): r["knn_over_best_memory"] for r in knn_rows},
        "storage_over_memory": {str(r["datastore_size"]): r["storage_over_memory"] for r in knn_rows},
        "mixing_overhead": {
            "in_hook_ms": round(in_hook_ms, 4), "share_of_memory_step": round(in_hook_ms / ms["mlp-memory"], 4),
            "step_difference_ms": round(overhead_ms, 4),
            "note": "a memory that costs nothing mixed by the same hooks: time inside the mixing hook per step "
                    "(log-softmaxes + interpolation; the hooks themselves measured free), and its whole decode step "
                    "minus base's (the same cost plus timing noise)",
        },
        "memory_speedup": {
            "best": best["variant"] if best else None,
            "decode_ms_added_eager": round(ms["mlp-memory"] - ms["base"], 4),
            "decode_ms_added_best": best["decode_ms_added"] if best else None,
            "isolated_ms_eager": eager_ms, "isolated_ms_best": best["ms_per_token"] if best else None,
            "note": "added: decode step minus base's, in the same rounds; isolated: the memory alone, hot cache",
        },
    }
    if best:
        name = f"mlp-memory+{best['variant']}"
        summary[f"{name}_over_base"] = round(ms[name] / ms["base"], 3)
        summary["decoder_equal_over_best_memory"] = round(ms["decoder-equal-params"] / ms[name], 3)
    report = {
        "results": results + knn_rows,
        "summary": summary,
        "memory_variants": [{k: v for k, v in row.items() if k != "module"} for row in variants],
        "models": {"base_params": base_params, "memory_params": memory_params, "memory_trained": trained,
                   "memory_blocks": getattr(memory.config, "n_blocks", None), "key_dim": d, "vocab_size": vocab,
                   "decoder_equal_params": results[-1]["params"], "decoder_equal_layers": decoder_layers,
                   "base_layers": lm.config.num_hidden_layers},
        "decode_ms_all": {k: round(v, 4) for k, v in ms.items()},
        "config": config.model_dump(mode="json"),
        "device": str(device), "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1),
        "provenance": environment(),
    }
    atomic_write_json(out_dir / "bench.json", report)
    plot(results + knn_rows, memory_bytes, out_dir / "bench.png")
    if not config.keep_indexes:
        shutil.rmtree(work, ignore_errors=True)
    print(format_table(results + knn_rows, ms["base"], tps["base"]))
    print(summary_lines(report))
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return report


def timed(fn, seconds: list[float]):
    """``fn`` noting each call's duration in ``seconds``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out
    return wrapper


def variant_bytes(variant: dict) -> int:
    """Bytes of a memory variant's weights as torch would save them (int8 packed weights included)."""
    import io

    buffer = io.BytesIO()
    torch.save(variant["module"].state_dict() if hasattr(variant["module"], "state_dict") else {}, buffer)
    return buffer.getbuffer().nbytes


def summary_lines(report: dict) -> str:
    s, m = report["summary"], report["models"]
    lines = [
        f"memory: {m['memory_params']:,} params ({'trained' if m['memory_trained'] else 'random init'}); base {m['base_params']:,}; "
        f"decoder-equal-params {m['decoder_equal_params']:,} ({m['decoder_equal_layers']} layers)",
        "memory per-token ms (batch 1) alone, hot cache / added to a decode step: " + ", ".join(
            f"{v['variant']} {v['ms_per_token']:.3f} / {v.get('decode_ms_added', float('nan')):.3f}"
            + (f" (KL {v['mean_kl']})" if v.get("mean_kl") is not None and v["variant"] != "eager" else "")
            for v in report["memory_variants"] if v["ms_per_token"] is not None),
        f"mlp-memory / base: {s['memory_over_base']}x; decoder-equal-params / mlp-memory: {s['decoder_equal_over_memory']}x"
        + (f" (/ best memory: {s['decoder_equal_over_best_memory']}x)" if "decoder_equal_over_best_memory" in s else ""),
        f"hooks + mixing: {s['mixing_overhead']['in_hook_ms']:.3f} ms = {100 * s['mixing_overhead']['share_of_memory_step']:.1f}% "
        f"of a memory decode step (step difference with a free memory: {s['mixing_overhead']['step_difference_ms']:.3f} ms)",
        "kNN-LM / memory decode: " + ", ".join(f"{k}: {v}x" for k, v in s["knn_over_memory"].items())
        + (" (/ best memory: " + ", ".join(f"{k}: {v}x" for k, v in s["knn_over_best_memory"].items()) + ")"
           if s["memory_speedup"]["best"] else ""),
        "storage (datastore + index) / memory: " + ", ".join(f"{k}: {v}x" for k, v in s["storage_over_memory"].items()),
        f"crossover: {s['crossover']['size'] or '-'} ({s['crossover']['note']})",
    ]
    return "\n".join(lines)
