"""``mlpmem bench``: decode latency, scoring throughput and storage of base, MLP memory, kNN-LM and a decoder of
equal parameters, measured side by side in one process.

    mlpmem bench --quick --run-dir runs/demo                  # a few minutes on 2 CPU cores
    mlpmem bench --run-dir runs/wt2 --out-dir runs/wt2/bench  # full: synthetic stores up to 50M entries

Systems (batch 1 decode through transformers' generate with the KV cache; median ms over every timed step;
one warm-up, then rounds that visit the systems in turn, so load changes hit all of them alike):
  * ``base``: the run's LM;
  * ``mlp-memory``: base + the run's memory (a random-init one of ``memory_blocks`` blocks when the run has none),
    mixed by the generation hooks; ``mlp-memory+VARIANT``: the same with a faithful speed-up;
  * ``knn-lm``: base + live retrieval at k = 1024, nprobe = 32, p_kNN aggregated over the vocabulary, on the
    run's own datastore and index when it has them and on synthetic IVF-PQ stores of ``datastore_sizes``
    (random keys of the real width, lists ≈ 4·sqrt(N); see ``mlpmem.bench.synthetic``);
  * ``decoder-equal-params``: the base architecture with more layers, so its parameters match base + memory
    (random init: only its speed matters).
Also: batched scoring throughput (log-probs of every token of ``score_batch`` windows), the memory's own
per-token cost eager vs bf16 / int8 / torch.compile, and the overhead of the hooks + mixing (a memory that costs
nothing, ``mlpmem.bench.overhead``) as a share of a memory decode step. Writes OUT/bench.json and OUT/bench.png;
``mlpmem.bench.report.print_report`` prints the table.

Steps: ``setup`` → ``measure_memory_variants`` → ``measure_fixed_systems`` (base, memory and its variants,
free memory, equal-size decoder) → ``measure_knn`` (one row per store) → ``summarise`` → outputs.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mlpmem.artifacts import Environment, RunDir, atomic_write_json, require_writable
from mlpmem.bench.long_context import long_context_decode
from mlpmem.bench.memory_speed import parameter_bytes, time_variants
from mlpmem.bench.overhead import free_memory_lm, mixing_overhead
from mlpmem.bench.report import output_dir, plot
from mlpmem.bench.synthetic import cached_synthetic_index, datastore_bytes
from mlpmem.config import BenchConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.inference.generation import MemoryAugmentedLM
from mlpmem.lm.keys import key_dim, key_module_path
from mlpmem.lm.load import load_lm, max_positions, run_lm_dir
from mlpmem.measure import NOISY, Spread, added_ms, interleaved_decode_ms, interleaved_scoring_tokens_per_s
from mlpmem.memory_system import SystemName
from mlpmem.systems import KNN_LM, MLP_MEMORY, SYSTEMS

log = logging.getLogger(__name__)

# --quick: what it changes, for fields the user did not set
QUICK = {
    "datastore_sizes": [10_000, 100_000],
    "new_tokens": 24,
    "repeats": 3,
    "prompt_tokens": 16,
    "score_batch": 4,
    "score_context": 64,
    "long_context": 512,
    "fidelity_tokens": 1024,
}
FAITHFUL_KL = 1e-3  # a speed-up is used end to end only when its mean KL to the eager memory stays below this
FREE = "hooks+mixing only"
DECODER = SystemName.DECODER_EQUAL_PARAMS


def with_quick(config: BenchConfig) -> BenchConfig:
    if not config.quick:
        return config
    return config.model_copy(update={k: v for k, v in QUICK.items() if k not in config.model_fields_set})


# set-up ---------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """The LM, the memory and the inputs every timing shares."""

    run: RunDir
    model_fp: str
    lm: PreTrainedModel
    memory: nn.Module  # float32: the reference of every variant
    used: nn.Module  # the memory at --memory-dtype: the mlp-memory, kNN-LM ratio and long-context rows
    valid_keys: torch.Tensor | None  # [n, d] the LM's keys at the memory's layer over valid tokens (fidelity)
    trained: bool  # the run's memory (else random init)
    memory_layer: str
    knn_layer: str  # where kNN-LM's queries come from: the run's datastore's layer, else the default key layer
    knn_dim: int
    vocab: int
    prompt: torch.Tensor  # [1, P] random token ids
    batch: torch.Tensor  # [B, T] random token ids (scoring)
    device: torch.device
    own_store: int | None  # entries of the run's datastore when kNN-LM can be timed on it (complete, this LM's)

    @property
    def base_params(self) -> int:
        return sum(p.numel() for p in self.lm.parameters())

    @property
    def memory_params(self) -> int:
        return sum(p.numel() for p in self.memory.parameters())


def own_datastore(run: RunDir, model_fp: str):
    """The run's datastore manifest when it and its index are complete and were built with this LM, else None."""
    if run.complete("datastore") is None or run.complete("index") is None:
        return None
    datastore = run.require("datastore")
    if datastore.model_fingerprint != model_fp:
        log.info("bench: the run's datastore was built with another model; timing synthetic stores only")
        return None
    run.require("index")
    return datastore


def setup(config: BenchConfig) -> Setup:
    """Load and check everything; UsageError (one line) before any timing."""
    run = RunDir(config.run_dir)
    device = resolve_device(config.device)
    model_fp = run.require("train-lm").model_fingerprint
    lm = load_lm(run_lm_dir(run.path), device)
    lm.generation_config.eos_token_id = None  # every timed generation runs its full length
    positions = max_positions(lm) or 1024
    if config.prompt_tokens + config.new_tokens > positions:
        raise UsageError(
            f"prompt tokens + new tokens ({config.prompt_tokens + config.new_tokens}) exceed the LM's {positions} "
            "positions",
            field="new_tokens",
        )
    memory, memory_layer, trained = MLP_MEMORY.bench_memory(
        run, lm, model_fp, config.memory_blocks, config.seed, device
    )
    used = MLP_MEMORY.quantize(memory, config.memory_dtype)
    valid_keys = fidelity_keys(run, lm, memory_layer, config.fidelity_tokens)
    datastore = own_datastore(run, model_fp)
    knn_layer = key_module_path(lm, datastore.key_layer if datastore is not None else None)
    vocab = int(lm.config.vocab_size)
    g = torch.Generator().manual_seed(config.seed)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=g).to(device)  # [1, P]
    batch = torch.randint(0, vocab, (config.score_batch, min(config.score_context, positions)), generator=g).to(
        device
    )  # [B, T]
    return Setup(
        run,
        model_fp,
        lm,
        memory,
        used,
        valid_keys,
        trained,
        memory_layer,
        knn_layer,
        key_dim(lm, knn_layer),
        vocab,
        prompt,
        batch,
        device,
        datastore.entries if datastore is not None else None,
    )


def fidelity_keys(run: RunDir, lm: PreTrainedModel, layer: str, n_tokens: int) -> torch.Tensor | None:
    """The LM's keys at ``layer`` [n, d] over the first ``n_tokens`` valid tokens (None without a valid split)."""
    from mlpmem.evaluate.scoring import score_tokens

    prepare = run.complete("prepare")
    if prepare is None or "valid" not in prepare.arrays:
        return None
    tokens = run.array("prepare", "valid", prepare)[:n_tokens]
    context = min(max_positions(lm) or 1024, 1024)
    scored = score_tokens(lm, tokens, context, max(1, context // 2), 8, [layer], desc="bench: valid keys")
    return torch.from_numpy(scored.keys[layer].astype(np.float32))


# measurements ---------------------------------------------------------------------------------------------------
def measure_memory_variants(s: Setup, config: BenchConfig) -> tuple[list[dict], list[dict]]:
    """(every variant's row, the faithful speed-ups: mean KL to eager <= FAITHFUL_KL on valid keys)."""
    log.info("bench: memory per-token cost (variants: eager, plain, %s)", ", ".join(config.optimisations))
    variants = time_variants(
        s.memory, config.optimisations, key_dim(s.lm, s.memory_layer), s.device, probe=s.valid_keys
    )
    faithful = [
        v for v in variants if v["variant"] != "eager" and v["ms_per_token"] is not None and v["mean_kl"] <= FAITHFUL_KL
    ]
    return variants, faithful


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


def variant_bytes(module: nn.Module) -> int:
    """Bytes of a memory variant's weights as torch would save them (int8 packed weights included)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict() if hasattr(module, "state_dict") else {}, buffer)
    return buffer.getbuffer().nbytes


@dataclass
class FixedSystems:
    """Timings of the systems whose cost does not depend on a datastore, by name."""

    ms: dict[str, float]  # decode ms per token (median over rounds)
    spread: dict[str, Spread]  # decode ms per token: min / median / max over rounds
    tps: dict[str, float]  # scoring tokens per second
    bytes: dict[str, int]
    rows: list[dict]  # bench.json rows: base, mlp-memory, mlp-memory+VARIANT..., decoder-equal-params
    mixing_overhead: dict[str, Any]
    decoder_params: int
    decoder_layers: int
    memory_lm: MemoryAugmentedLM  # the eager memory, timed again beside each kNN-LM store


def measure_fixed_systems(s: Setup, config: BenchConfig, faithful: list[dict]) -> FixedSystems:
    """Decode latency and scoring throughput of base, memory (eager and faithful variants), the free memory and
    the equal-size decoder, in interleaved rounds."""
    log.info("bench: decode latency and scoring throughput of base, memory, equal-size decoder")
    decoder, decoder_layers = decoder_equal_params(s.lm, s.base_params + s.memory_params, s.device)
    mlm = MemoryAugmentedLM(s.lm, memory=s.used, lmbda=config.lmbda, memory_layer=s.memory_layer)
    decode = {SystemName.BASE: plain_generate(s.lm), SystemName.MLP_MEMORY: mlm.generate}
    score = {SystemName.BASE: plain_score(s.lm), SystemName.MLP_MEMORY: mlm.joint_log_probs}
    sizes = {
        SystemName.BASE: parameter_bytes(s.lm),
        SystemName.MLP_MEMORY: variant_bytes(s.used),
        DECODER: parameter_bytes(decoder),
    }
    for v in faithful:  # in a decode step the memory's weights compete with the LM's for cache: time them there
        name = f"mlp-memory+{v['variant']}"
        fast = MemoryAugmentedLM(s.lm, memory=v["module"], lmbda=config.lmbda, memory_layer=s.memory_layer)
        decode[name], score[name], sizes[name] = fast.generate, fast.joint_log_probs, variant_bytes(v["module"])
    free = free_memory_lm(s.lm, config.lmbda, s.memory_layer)
    decode[FREE] = free.generate
    decode[DECODER], score[DECODER] = plain_generate(decoder), plain_score(decoder)
    spread = interleaved_decode_ms(decode, s.prompt, config.new_tokens, config.repeats)
    ms = {name: t.median for name, t in spread.items()}
    tps = interleaved_scoring_tokens_per_s(score, s.batch, config.repeats)
    decoder_params = sum(p.numel() for p in decoder.parameters())
    rows = []
    for name in score:
        row = {
            "system": name,
            "datastore_size": None,
            "synthetic": False,
            "ms_per_token": round(ms[name], 4),
            "ms_spread": spread[name].rounded(),
            "noisy": spread[name].noisy or spread[SystemName.BASE].noisy,  # its ratio to base is unreliable
            "tokens_per_s": round(tps[name], 1),
            "bytes": sizes[name],
        }
        if name == DECODER:
            row.update(layers=decoder_layers, params=decoder_params)
        rows.append(row)
    overhead = mixing_overhead(free, spread[FREE], spread[SystemName.BASE], ms[SystemName.MLP_MEMORY])
    return FixedSystems(ms, spread, tps, sizes, rows, overhead, decoder_params, decoder_layers, mlm)


def best_variant(variants: list[dict], faithful: list[dict], fixed: FixedSystems) -> dict | None:
    """Note each variant's decode ms added to base (None: not measurable above the noise); the faithful one with
    the fastest step, when it beats eager end to end."""
    eager = next(v for v in variants if v["variant"] == "eager")
    eager["decode_ms_added"] = added_ms(fixed.spread[SystemName.MLP_MEMORY], fixed.spread[SystemName.BASE])
    for v in faithful:
        v["decode_ms_added"] = added_ms(fixed.spread[f"mlp-memory+{v['variant']}"], fixed.spread[SystemName.BASE])
    best = min(faithful, key=lambda v: fixed.ms[f"mlp-memory+{v['variant']}"], default=None)
    return best if best and fixed.ms[f"mlp-memory+{best['variant']}"] < fixed.ms[SystemName.MLP_MEMORY] else None


@dataclass
class Store:
    """A datastore kNN-LM is timed on: the run's own or a synthetic one."""

    size: int
    synthetic: bool
    build_s: float | None = None


def stores(config: BenchConfig, s: Setup) -> list[Store]:
    """The run's own store (when complete and built with this LM), then the synthetic sizes."""
    out = [Store(s.own_store, False)] if s.own_store is not None else []
    return out + [Store(int(n), True) for n in sorted(set(config.datastore_sizes))]


def open_store(store: Store, config: BenchConfig, s: Setup, work: Path) -> tuple[Any, int, str]:
    """(retriever with k and nprobe of the config, bytes of datastore + index, index factory)."""
    if not store.synthetic:
        retriever, datastore = KNN_LM.load(
            s.run, s.model_fp, min(config.k, store.size), config.nprobe, temperature=config.knn_temperature
        )
        index = s.run.require("index")
        size = sum(r.bytes for r in datastore.files.values()) + sum(r.bytes for r in index.files.values())
        return retriever, size, index.factory or "?"
    t0 = time.time()
    index, factory, path, reused = cached_synthetic_index(
        work, store.size, s.knn_dim, config.k, config.nprobe, config.seed
    )  # kept indexes are reused by the next bench with the same out dir
    size = datastore_bytes(store.size, s.knn_dim) + path.stat().st_size
    if not config.keep_indexes:
        path.unlink()
    store.build_s = None if reused else round(time.time() - t0, 1)
    values = np.random.default_rng(config.seed).integers(0, s.vocab, store.size, dtype=np.int32)
    retriever = KNN_LM.retriever(
        index, values, k=min(config.k, int(index.ntotal)), temperature=config.knn_temperature, nprobe=config.nprobe
    )
    return retriever, size, factory


def measure_knn(
    store: Store, config: BenchConfig, s: Setup, fixed: FixedSystems, best: dict | None, work: Path
) -> dict:
    """One kNN-LM row: its decode step timed in the same rounds as the eager memory's, and scoring throughput."""
    label = f"{store.size:,} entries" + (" (synthetic)" if store.synthetic else " (the run's datastore)")
    log.info("bench: kNN-LM on %s", label)
    retriever, store_bytes, factory = open_store(store, config, s, work)
    knn = MemoryAugmentedLM(s.lm, knn=retriever, knn_lmbda=config.lmbda, knn_layer=s.knn_layer)
    block = interleaved_decode_ms(
        {SystemName.KNN_LM: knn.generate, SystemName.MLP_MEMORY: fixed.memory_lm.generate},
        s.prompt,
        config.new_tokens,
        config.repeats,
    )
    knn_tps = interleaved_scoring_tokens_per_s({SystemName.KNN_LM: knn.joint_log_probs}, s.batch, config.repeats)[
        SystemName.KNN_LM
    ]
    best_ms = fixed.ms[f"mlp-memory+{best['variant']}"] if best else None
    knn_ms, memory_ms = block[SystemName.KNN_LM].median, block[SystemName.MLP_MEMORY].median
    row = {
        "system": SystemName.KNN_LM,
        "datastore_size": store.size,
        "synthetic": store.synthetic,
        "ms_per_token": round(knn_ms, 4),
        "ms_spread": block[SystemName.KNN_LM].rounded(),
        "noisy": block[SystemName.KNN_LM].noisy
        or block[SystemName.MLP_MEMORY].noisy,  # its ratio to the memory is unreliable
        "tokens_per_s": round(knn_tps, 1),
        "bytes": int(store_bytes),
        "index": factory,
        "k": retriever.k,
        "nprobe": config.nprobe,
        "memory_ms_same_rounds": round(memory_ms, 4),
        "knn_over_memory": round(knn_ms / memory_ms, 3),
        "knn_over_best_memory": round(knn_ms / best_ms, 3) if best_ms else None,
        "storage_over_memory": round(store_bytes / fixed.bytes[SystemName.MLP_MEMORY], 2),
    }
    if store.build_s is not None:
        row["build_s"] = store.build_s
    return row


def measure_long_context(s: Setup, config: BenchConfig, fixed: FixedSystems) -> dict[str, Any]:
    """Base, base + memory (at --memory-dtype) and the equal-parameter decoder decoding with a KV cache of
    ``long_context`` tokens (random-init transformers of the LM's architecture: see ``mlpmem.bench.long_context``)."""
    log.info("bench: base + memory vs equal-parameter decoder at context %d", config.long_context)
    spread = long_context_decode(
        s.lm,
        s.used,
        s.memory_layer,
        fixed.decoder_layers,
        config.long_context,
        config.new_tokens,
        config.repeats,
        config.lmbda,
    )
    ms = {name: t.median for name, t in spread.items()}
    return {
        "context": config.long_context,
        "memory_dtype": config.memory_dtype,
        "ms_per_token": {name: round(v, 4) for name, v in ms.items()},
        "ms_spread": {name: t.rounded() for name, t in spread.items()},
        "noisy": sorted(name for name, t in spread.items() if t.noisy),
        "memory_added_over_base_step": round(ms[SystemName.MLP_MEMORY] / ms[SystemName.BASE] - 1, 3),
        "decoder_equal_over_memory": round(ms[DECODER] / ms[SystemName.MLP_MEMORY], 3),
    }


# summary --------------------------------------------------------------------------------------------------------
def crossover(knn_rows: list[dict], memory_ms: float) -> dict[str, Any]:
    """The datastore size where kNN-LM's decode step becomes slower than the memory's (log-linear interpolation
    over the synthetic stores, which share one index recipe; over all stores when there are none)."""
    rows = sorted([r for r in knn_rows if r["synthetic"]] or knn_rows, key=lambda r: r["datastore_size"])
    if not rows:
        return {"size": None, "note": "no kNN-LM timings"}
    if rows[0]["ms_per_token"] >= memory_ms:
        return {
            "size": None,
            "note": f"kNN-LM is slower than the memory at every size measured (from {rows[0]['datastore_size']})",
        }
    for a, b in zip(rows, rows[1:]):
        if a["ms_per_token"] < memory_ms <= b["ms_per_token"]:
            la, lb = math.log(a["datastore_size"]), math.log(b["datastore_size"])
            t = (memory_ms - a["ms_per_token"]) / (b["ms_per_token"] - a["ms_per_token"])
            return {"size": int(math.exp(la + t * (lb - la))), "note": "interpolated between measured sizes"}
    return {"size": None, "note": f"kNN-LM stays faster than the memory up to {rows[-1]['datastore_size']} entries"}


def summarise(
    fixed: FixedSystems, knn_rows: list[dict], variants: list[dict], best: dict | None, long: dict[str, Any]
) -> dict[str, Any]:
    """bench.json's ``summary``: ratios, crossover sizes, mixing overhead, the memory speed-up and the targets."""
    ms = fixed.ms
    best_name = f"mlp-memory+{best['variant']}" if best else None
    eager = next(v for v in variants if v["variant"] == "eager")
    int8 = next((v for v in variants if v["variant"] == "int8"), {})
    summary = {
        "targets": {
            "int8_kl_to_fp32_valid_keys": int8.get("mean_kl"),
            "memory_added_over_base_step": round(ms[SystemName.MLP_MEMORY] / ms[SystemName.BASE] - 1, 3),
            "decoder_equal_over_memory_at_long_context": long["decoder_equal_over_memory"],
            "knn_over_memory": {str(r["datastore_size"]): r["knn_over_memory"] for r in knn_rows},
            "goals": "int8 KL <= 1e-3; memory added <= 0.5 of the base step; decoder / (base + memory) >= 1.3 at "
            "the long context",
        },
        "memory_over_base": round(ms[SystemName.MLP_MEMORY] / ms[SystemName.BASE], 3),
        "decoder_equal_over_memory": round(ms[DECODER] / ms[SystemName.MLP_MEMORY], 3),
        "crossover": crossover(knn_rows, ms[SystemName.MLP_MEMORY]),
        "crossover_best_memory": crossover(knn_rows, ms[best_name]) if best else None,
        "knn_over_memory": {str(r["datastore_size"]): r["knn_over_memory"] for r in knn_rows},
        "knn_over_best_memory": {str(r["datastore_size"]): r["knn_over_best_memory"] for r in knn_rows},
        "storage_over_memory": {str(r["datastore_size"]): r["storage_over_memory"] for r in knn_rows},
        "mixing_overhead": fixed.mixing_overhead,
        "memory_speedup": {
            "best": best["variant"] if best else None,
            "decode_ms_added_eager": eager["decode_ms_added"],
            "decode_ms_added_best": best["decode_ms_added"] if best else None,
            "isolated_ms_eager": eager["ms_per_token"],
            "isolated_ms_best": best["ms_per_token"] if best else None,
            "note": "added: decode step minus base's, in the same rounds (null: not above the spread of the rounds); "
            "isolated: the memory alone, hot cache",
        },
        "noisy": sorted({r["system"] for r in fixed.rows + knn_rows if r["noisy"]}),
        "noise_note": f"rows whose rounds spread by more than {NOISY:.0%} of their median (or whose reference's "
        "do): their ratios are not meaningful; rerun on an idle machine",
    }
    if best:
        summary[f"{best_name}_over_base"] = round(ms[best_name] / ms[SystemName.BASE], 3)
        summary["decoder_equal_over_best_memory"] = round(ms[DECODER] / ms[best_name], 3)
    return summary


# the command ----------------------------------------------------------------------------------------------------
def bench(config: BenchConfig) -> dict[str, Any]:
    """Run every timing; returns the bench.json dict (also written to OUT_DIR, with bench.png)."""
    config = with_quick(config)
    started = time.time()
    out_dir = output_dir(config)
    require_writable(out_dir, "out_dir" if config.out_dir else "run_dir", inside=True)  # before minutes of timing
    s = setup(config)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        variants, faithful = measure_memory_variants(s, config)
        fixed = measure_fixed_systems(s, config, faithful)
        best = best_variant(variants, faithful, fixed)
        knn_rows = [measure_knn(store, config, s, fixed, best, work) for store in stores(config, s)]
        long = measure_long_context(s, config, fixed)
    finally:
        if not config.keep_indexes:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "results": fixed.rows + knn_rows,
        "summary": summarise(fixed, knn_rows, variants, best, long),
        "long_context": long,
        "memory_variants": [{k: v for k, v in row.items() if k != "module"} for row in variants],
        "models": {
            "base_params": s.base_params,
            "memory_params": s.memory_params,
            "memory_trained": s.trained,
            "memory_blocks": getattr(s.memory.config, "n_blocks", None),
            "key_dim": s.knn_dim,
            "memory_key_dim": key_dim(s.lm, s.memory_layer),
            "memory_layer": s.memory_layer,
            "knn_layer": s.knn_layer,
            "vocab_size": s.vocab,
            "decoder_equal_params": fixed.decoder_params,
            "decoder_equal_layers": fixed.decoder_layers,
            "base_layers": s.lm.config.num_hidden_layers,
        },
        "decode_ms_all": {k: round(v, 4) for k, v in fixed.ms.items()},
        "config": config.model_dump(mode="json"),
        "device": str(s.device),
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - started, 1),
        "provenance": Environment.current().model_dump(),
    }
    for system in SYSTEMS:  # a registered system the run has: its own section
        if (section := system.bench(s.run, s.prompt, config, s.device)) is not None:
            report[system.name] = section
    atomic_write_json(out_dir / "bench.json", report)
    plot(report["results"], fixed.bytes[SystemName.MLP_MEMORY], out_dir / "bench.png")
    return report
