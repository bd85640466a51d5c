"""``mlpmem evaluate``: perplexity of the base LM, kNN-LM, MLP memory and memory + kNN-LM on the same tokens.

    mlpmem evaluate --run-dir runs/demo
    mlpmem evaluate --model gpt2 --corpus wikitext-2 --context 1024 --stride 512

λ (and the kNN temperature T) are tuned on valid over a grid and applied to test. Writes
RUN/evaluate/results.json and lambda.png, and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.artifacts import Stage, atomic_write_json, environment, open_array, read_json, require_stage
from mlpmem.config import EvaluateConfig
from mlpmem.data.corpus import load_corpus
from mlpmem.data.prepare import encode, vocab_fingerprint
from mlpmem.data.tokens import open_split
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.evaluate.report import plot_lambda_curves
from mlpmem.evaluate.scoring import knn_log_prob, memory_log_prob, score_tokens
from mlpmem.evaluate.tune import mixed_perplexity, perplexity, tune_lambda, tune_pair
from mlpmem.lm.load import load_lm, load_tokenizer, max_positions, model_fingerprint, require_model, run_lm_dir


def complete_manifest(run_dir: Path, stage: str) -> dict | None:
    manifest = Stage(run_dir, stage).read()
    return manifest if manifest and manifest.get("status") == "complete" else None


def resolve_sources(config: EvaluateConfig) -> tuple[str, str, str, dict[str, np.ndarray]]:
    """(model path or id, model fingerprint, tokenizer fingerprint, tokens per split)."""
    if config.model is not None:
        model_path, model_fp = require_model(config.model), model_fingerprint(config.model)
    else:
        model_path = str(run_lm_dir(config.run_dir))
        model_fp = read_json(Path(config.run_dir) / "lm" / "manifest.json")["model_fingerprint"]
    if config.corpus is not None:
        tokenizer = load_tokenizer(model_path)
        corpus = load_corpus(config.corpus)
        tokens = {s: encode(tokenizer, corpus.splits[s], s) for s in config.splits}
        return model_path, model_fp, vocab_fingerprint(tokenizer), tokens
    prep = require_stage(config.run_dir, "prepare", f"mlpmem prepare --run-dir {config.run_dir}")
    if config.model is not None and vocab_fingerprint(load_tokenizer(config.model)) != prep["tokenizer_fingerprint"]:
        raise UsageError(f"{config.run_dir} was prepared with another tokenizer than {config.model}'s; pass --corpus or use a matching run")
    return model_path, model_fp, prep["tokenizer_fingerprint"], {s: open_split(config.run_dir, s) for s in config.splits}


def check_datastore(datastore: dict, model_fp: str, tokenizer_fp: str, k: int) -> None:
    if datastore["model_fingerprint"] != model_fp:
        raise UsageError("the run's datastore was built with another model than the one evaluated; pass --knn false or rebuild it")
    if datastore["tokenizer_fingerprint"] != tokenizer_fp:
        raise UsageError("the run's datastore was built with another tokenizer; pass --knn false or rebuild it")
    if k > datastore["counts"]["entries"]:
        raise UsageError(f"--k {k} is larger than the datastore ({datastore['counts']['entries']} entries)")


def evaluate(config: EvaluateConfig) -> dict:
    """Score, tune on valid, apply to test; returns the results dict (also RUN/evaluate/results.json)."""
    model_path, model_fp, tokenizer_fp, tokens = resolve_sources(config)
    run_dir = Path(config.run_dir)
    datastore = complete_manifest(run_dir, "datastore") if config.knn and config.corpus is None else None
    index_manifest = complete_manifest(run_dir, "index") if datastore else None
    memory_manifest = complete_manifest(run_dir, "memory") if config.memory and config.corpus is None else None
    if datastore and index_manifest:
        check_datastore(datastore, model_fp, tokenizer_fp, config.k)
    inputs = {"model": model_fp, "tokenizer": tokenizer_fp}
    for name, manifest in (("datastore", datastore), ("index", index_manifest), ("memory", memory_manifest)):
        if manifest:
            inputs[name] = manifest["fingerprint"]
    stage = Stage(run_dir, "evaluate")
    if stage.begin(config.model_dump(mode="json", exclude={"run_dir", "device", "batch_size"}), inputs) == "complete":
        return read_json(stage.dir / "results.json")

    device = resolve_device(config.device)
    memory = None
    if memory_manifest:
        from mlpmem.memory.model import check_pairing
        from mlpmem.memory.train import load_memory

        memory = load_memory(run_dir).to(device).eval()
        check_pairing(memory.config, model_fp, datastore["key_layer"] if datastore else memory.config.key_layer)
    model = load_lm(model_path, device)
    index = None
    if datastore and index_manifest:
        from mlpmem.knn.index import load_index

        index, _ = load_index(run_dir, datastore)
    key_layer = datastore["key_layer"] if datastore else (memory.config.key_layer if memory else None)
    if index is None and memory is None:
        key_layer = None

    lm_manifest = complete_manifest(run_dir, "lm")
    context = config.context or (lm_manifest["context"] if lm_manifest and config.model is None else max_positions(model)) or 1024
    positions = max_positions(model)
    if positions is not None and context > positions:
        raise UsageError(f"--context {context} exceeds the model's {positions} positions")
    stride = config.stride or max(1, context // 2)
    values = np.asarray(open_array(run_dir, "datastore", "values")) if index is not None else None
    stored_keys = open_array(run_dir, "datastore", "keys") if (index is not None and config.rerank) else None

    parts: dict[str, dict[str, np.ndarray]] = {}
    for split, split_tokens in tokens.items():
        split_tokens = split_tokens[: config.max_tokens] if config.max_tokens else split_tokens
        scored = score_tokens(model, split_tokens, context, stride, config.batch_size, device, key_layer, desc=f"evaluate {split}")
        parts[split] = {"lm": scored.lm_log_prob}
        if memory is not None:
            parts[split]["mem"] = memory_log_prob(memory, scored.keys, scored.gold, device)
        if index is not None:
            parts[split]["knn"] = knn_log_prob(
                index, scored.keys, scored.gold, values, config.k, config.knn_temperatures, config.nprobe, stored_keys
            )
    results, curves = summarise(parts, config)
    results.update(
        context=context, stride=stride, model=str(model_path),
        tokens={s: int(len(p["lm"])) for s, p in parts.items()},
        config=config.model_dump(mode="json"),
        provenance=environment(),
    )
    if curves:
        plot_lambda_curves(curves, results["systems"][0][f"{results['tuned_on']}_ppl"], stage.dir / "lambda.png")
    atomic_write_json(stage.dir / "results.json", results)
    stage.complete({f"{s}_tokens": n for s, n in results["tokens"].items()}, results_path="results.json")
    return results


def summarise(parts: dict[str, dict[str, np.ndarray]], config: EvaluateConfig) -> tuple[dict, dict[str, dict[float, float]]]:
    """Systems with λ (and T) tuned on valid (when scored) and applied to every split; and the λ curves."""
    tune_split = "valid" if "valid" in parts else next(iter(parts))
    tune = parts[tune_split]
    ppl = lambda split, comps, weights: mixed_perplexity([parts[split][c] for c in comps], weights)  # noqa: E731
    systems = [{"name": "base", **{f"{s}_ppl": perplexity(p["lm"]) for s, p in parts.items()}, "lambda": None, "temperature": None}]
    curves: dict[str, dict[float, float]] = {}
    best_t = None
    if "knn" in tune:
        scores = {}
        for t, temperature in enumerate(config.knn_temperatures):
            lmbda, curve = tune_lambda(tune["lm"], tune["knn"][:, t], config.lmbdas)
            scores[(t, lmbda)] = curve[lmbda]
        (best_t, lmbda_knn) = min(scores, key=scores.get)
        for p in parts.values():
            p["knn"] = p["knn"][:, best_t]
        _, curves["knn-lm"] = tune_lambda(tune["lm"], tune["knn"], config.lmbdas)
        systems.append({"name": "knn-lm", **{f"{s}_ppl": ppl(s, ["lm", "knn"], [1 - lmbda_knn, lmbda_knn]) for s in parts},
                        "lambda": lmbda_knn, "temperature": config.knn_temperatures[best_t]})
    if "mem" in tune:
        lmbda_mem, curves["mlp-memory"] = tune_lambda(tune["lm"], tune["mem"], config.lmbdas)
        systems.append({"name": "mlp-memory", **{f"{s}_ppl": ppl(s, ["lm", "mem"], [1 - lmbda_mem, lmbda_mem]) for s in parts},
                        "lambda": lmbda_mem, "temperature": None})
    if "mem" in tune and "knn" in tune:
        (lm_, lk), _ = tune_pair(tune["lm"], tune["mem"], tune["knn"], config.lmbdas)
        weights = [1 - lm_ - lk, lm_, lk]
        systems.append({"name": "mlp-memory+knn-lm", **{f"{s}_ppl": ppl(s, ["lm", "mem", "knn"], weights) for s in parts},
                        "lambda": round(lm_ + lk, 6), "weights": {"mlp-memory": lm_, "knn-lm": lk},
                        "temperature": config.knn_temperatures[best_t]})
    for s in systems:
        s.setdefault("valid_ppl", None)
        s.setdefault("test_ppl", None)
    curves_json = {name: {str(x): y for x, y in curve.items()} for name, curve in curves.items()}
    return {"systems": systems, "tuned_on": tune_split, "lambda_curves": curves_json}, curves
