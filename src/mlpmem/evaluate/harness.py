"""``mlpmem lm-eval``: any lm-evaluation-harness task on an exported model's base LM and on the LM + memory.

    pip install 'mlpmem[eval]'
    mlpmem export --run-dir runs/demo --out exports/demo
    mlpmem lm-eval --model exports/demo --tasks lambada_openai hellaswag --limit 200

Both systems go through lm-eval's own ``HFLM`` (its request building, batching, windowing and metrics): the base
LM is the one inside the folder (``model.lm``), the memory-augmented model the folder's joint model, whose logits
are the mixed log-probs. Nothing of lm-eval's logic is copied here. Beware: lm-eval's ``wikitext`` is a
different perplexity (disjoint windows, word/byte level) from ``mlpmem evaluate``'s stride token perplexity.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpmem.config import LmEvalConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.memory_system import SystemName

SYSTEMS = (SystemName.BASE, SystemName.MLP_MEMORY)
SHIPPED_TASKS = Path(__file__).parent / "lm_eval_tasks"  # tasks shipped with mlpmem (wikitext2_slice), always found


@dataclass
class SideBySide:
    """lm-eval's results per system (``simple_evaluate``'s dicts, samples included) and the metrics table rows."""

    results: dict[str, dict[str, Any]]
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)  # task, metric, base, mlp-memory


def load_exported(folder: str | Path, device: Any = "cpu") -> Any:
    """An exported joint model (``mlpmem export``) in eval mode; UsageError (one line) for anything else."""
    from transformers import AutoModelForCausalLM

    from mlpmem.inference.joint import MemoryAugmentedForCausalLM

    path = Path(folder).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"{path} holds no model (no config.json); write one with `mlpmem export`", field="model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise UsageError(f"cannot load {path}: {str(err).strip().splitlines()[0]}", field="model") from None
    if not isinstance(model, MemoryAugmentedForCausalLM):
        raise UsageError(f"{path} holds a {type(model).__name__}, not an `mlpmem export` folder", field="model")
    return model.to(device).eval()


def load_export_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in an exported folder; UsageError (one line) when it is missing or unreadable."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UsageError(f"{folder} holds no tokenizer (tokenizer.json); re-export it (mlpmem export)", field="model")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"cannot load the tokenizer of {folder}: {reason}; re-export it (mlpmem export)", field="model"
        ) from None


def task_manager(config: LmEvalConfig) -> Any:
    """lm-eval's TaskManager with mlpmem's shipped tasks (and ``include_path``); UsageError naming unknown tasks."""
    from lm_eval.tasks import TaskManager

    if config.include_path is not None and not Path(config.include_path).expanduser().is_dir():
        raise UsageError(f"{config.include_path} is not a folder of task YAMLs", field="include_path")
    folders = [SHIPPED_TASKS] + ([Path(config.include_path).expanduser()] if config.include_path else [])
    manager = TaskManager(include_path=[str(f) for f in folders])
    unknown = [t for t in config.tasks if not manager.match_tasks([t])]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)}", field="tasks")
    return manager


def lm_eval_side_by_side(config: LmEvalConfig) -> SideBySide:
    """Run ``config.tasks`` through lm-eval on the base LM and on the memory-augmented model."""
    check_out_path(config)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UsageError("lm-eval is not installed: pip install 'mlpmem[eval]'") from None
    from mlpmem.lm.load import max_positions

    manager = task_manager(config)
    device = resolve_device(config.device)
    joint = load_exported(config.model, device)
    tokenizer = load_export_tokenizer(Path(config.model).expanduser())
    results = {}
    for name, model in zip(SYSTEMS, (joint.lm, joint)):
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            backend="causal",
            batch_size=config.batch_size,
            max_length=max_positions(joint.lm),
            device=str(device),
        )
        results[name] = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            task_manager=manager,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            log_samples=True,
        )
    out = SideBySide(results, metric_rows(results))
    if config.out_path is not None:
        write_json(out, config)
    check_finite_results(out)
    return out


def check_out_path(config: LmEvalConfig) -> None:
    """Refuse an ``--out-path`` that cannot be written before both systems are evaluated."""
    from mlpmem.artifacts import require_writable

    if config.out_path is None:
        return
    if Path(config.out_path).expanduser().is_dir():
        raise UsageError(f"{config.out_path} is a folder; give the path of a JSON file", field="out_path")
    require_writable(config.out_path, "out_path")


def check_finite_results(out: SideBySide) -> None:
    """UsageError naming the first metric, else the first task whose per-sample result, is nan: a model whose
    outputs are not numbers (an accuracy over nan log-likelihoods would still print as a number)."""
    for task, metric, base, memory in out.rows:
        for name, value in (("base", base), ("+ memory", memory)):
            if math.isnan(value):
                raise UsageError(f"lm-eval gave nan for {task} {metric} ({name}): the model's outputs are not numbers")
    for name, result in out.results.items():
        for task, samples in result.get("samples", {}).items():
            if any(has_nan(sample.get("filtered_resps")) for sample in samples):
                raise UsageError(
                    f"lm-eval's {task} ({name}) scored nan log-likelihoods: the model's outputs are not numbers"
                )


def has_nan(value: Any) -> bool:
    """Whether a (nested) lm-eval response holds a nan float."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list | tuple):
        return any(has_nan(v) for v in value)
    return False


def metric_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, float]]:
    """(task, metric, base, mlp-memory) for every metric lm-eval reports (standard errors left out)."""
    rows = []
    base, memory = results[SystemName.BASE]["results"], results[SystemName.MLP_MEMORY]["results"]
    for task, metrics in base.items():
        for key, value in metrics.items():
            metric = "," in key and not isinstance(value, bool) and isinstance(value, int | float)
            if not metric or "_stderr" in key:  # lm-eval's metrics are "name,filter"; sample_len etc. are not
                continue
            rows.append((task, key.split(",")[0], float(value), float(memory[task][key])))
    return rows


def write_json(out: SideBySide, config: LmEvalConfig) -> None:
    from mlpmem.artifacts import Environment, atomic_write_json

    keep = ("results", "versions", "n-shot", "config")
    payload = {name: {k: r[k] for k in keep if k in r} for name, r in out.results.items()}
    payload["provenance"] = Environment.current().model_dump()
    payload["command_config"] = config.model_dump(mode="json")
    atomic_write_json(Path(config.out_path).expanduser(), json.loads(json.dumps(payload, default=str)))


def print_side_by_side(out: SideBySide, config: LmEvalConfig | None = None) -> None:
    """One line per task and metric: base, + memory and the difference."""
    print(f"{'task':<24} {'metric':<16} {'base':>10} {'+ memory':>10} {'diff':>10}")
    for task, metric, base, memory in out.rows:
        diff = memory - base if math.isfinite(base) and math.isfinite(memory) else float("nan")
        print(f"{task:<24} {metric:<16} {base:>10.4f} {memory:>10.4f} {diff:>+10.4f}")
    if config is not None and config.out_path is not None:
        print(f"results: {config.out_path}")
