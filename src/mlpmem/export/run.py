"""``mlpmem export``: write a run's base LM + MLP memory (+ kNN-LM settings) as one Hugging Face model folder.

    mlpmem export --run-dir runs/demo --out exports/demo
    python -c "import mlpmem, transformers; print(transformers.pipeline('text-generation', model='exports/demo'))"

The folder: ``config.json`` (the joint model's config, with the LM's and the memory's), ``model.safetensors`` (the
LM's weights as ``lm.*``, the memory's as ``memory.*``), ``generation_config.json``, the tokenizer, and
``README.md`` (the model card: ``mlpmem.export.card``). λ is the one ``mlpmem evaluate`` tuned with this memory,
else the one saved with the memory (``--lmbda`` overrides). Written beside the destination and swapped in when
complete; an existing destination is replaced only when it holds an earlier export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mlpmem.artifacts import RunDir, disk_errors, require_writable
from mlpmem.config import ExportConfig
from mlpmem.errors import UsageError
from mlpmem.export.card import model_card
from mlpmem.inference.configuration import MODEL_TYPE

log = logging.getLogger(__name__)


@dataclass
class Exported:
    """What ``mlpmem export`` wrote: the folder, the weights used, where λ came from, the files and their bytes."""

    out_dir: Path
    lmbda: float
    lmbda_source: str
    knn_lmbda: float
    files: dict[str, int]


def check_destination(out_dir: Path) -> None:
    """UsageError when ``out_dir`` is the current folder or holds it, cannot be written, or exists and is not an
    earlier export (never overwrite other files)."""
    cwd = Path.cwd()
    if out_dir == cwd or out_dir in cwd.parents:
        raise UsageError(
            f"{out_dir} is the current folder or holds it, and the export replaces its destination; "
            "choose a new folder (e.g. --out exports/NAME)",
            field="out_dir",
        )
    require_writable(out_dir, "out_dir")
    if not out_dir.exists():
        return
    config = out_dir / "config.json"
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type != MODEL_TYPE:
        raise UsageError(f"{out_dir} exists and is not an mlpmem export; choose another folder", field="out_dir")


def lmbda_source(config: ExportConfig, tuned_lmbda: float | None) -> str:
    if config.lmbda is not None:
        return "set with --lmbda"
    return "tuned on valid by mlpmem evaluate" if tuned_lmbda is not None else "the memory's default (no evaluation)"


def export_model(config: ExportConfig) -> Exported:
    """Load the run's joint model (checked: complete stages, memory paired with the LM), write it, swap it in."""
    from mlpmem.inference.generation import joint_model_from_run, tuned_values
    from mlpmem.lm.load import load_tokenizer, run_lm_dir

    run = RunDir(config.run_dir)
    out_dir = Path(os.path.abspath(Path(config.out_dir).expanduser()))  # "." or "a/.." named by their folder
    check_destination(out_dir)
    lm_manifest = run.require("train-lm")
    run.require("train-memory")
    model = joint_model_from_run(
        run.path,
        lmbda=config.lmbda,
        use_knn=config.knn,
        k=config.k,
        knn_temperature=config.knn_temperature,
        knn_lmbda=config.knn_lmbda,
        nprobe=config.nprobe,
        device="cpu",
        memory_dtype=config.memory_dtype,
    )
    tokenizer = load_tokenizer(run_lm_dir(run.path))
    tuned = tuned_values(run, lm_manifest.model_fingerprint, True, config.knn)
    source = lmbda_source(config, tuned.lmbda)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:  # a failed write (a full disk) leaves neither a half export nor its partial folder
        with disk_errors(partial):
            partial.mkdir(parents=True)
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            card = model_card(run, model, config, source, command_line(config))
            (partial / "README.md").write_text(card, encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_in(partial, out_dir)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    return Exported(out_dir, model.lmbda, source, model.knn_lmbda, files)


def swap_in(partial: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete ``partial`` folder (the old export is removed only after the rename)."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def command_line(config: ExportConfig) -> str:
    """The ``mlpmem export`` command that gives this config (the fields set, in order)."""
    parts = ["mlpmem export", f"--run-dir {config.run_dir}"]
    for name in ExportConfig.model_fields:
        if name in config.model_fields_set and name != "run_dir":
            value = getattr(config, name)
            flag = "--out" if name == "out_dir" else f"--{name.replace('_', '-')}"
            parts.append(f"{flag} {str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts)


def edge_lambda_warning(result: Exported) -> str | None:
    """What an edge λ means for the exported model, or None: at λ = 0 the memory is not used, and when the memory
    and kNN-LM weights reach 1 the base LM is out of the mixture (often a λ grid's edge, worth a wider grid)."""
    if result.lmbda + result.knn_lmbda >= 1:
        return (
            f"memory λ={result.lmbda:g}{f' + kNN-LM λ={result.knn_lmbda:g}' if result.knn_lmbda else ''} leaves "
            "the base LM out of the exported model's mixture; if λ was tuned, widen `evaluate --lmbdas` below 1 or "
            "pass --lmbda"
        )
    if result.lmbda == 0:
        return "memory λ=0: the exported model never uses its memory (the base LM alone); pass --lmbda"
    return None


def print_export(result: Exported, config: ExportConfig | None = None) -> None:
    """Where the folder is, λ and where it came from (a warning at an edge of [0, 1]), each file's size."""
    knn = f", kNN-LM λ={result.knn_lmbda:g}" if result.knn_lmbda else ""
    if (warning := edge_lambda_warning(result)) is not None:
        log.warning(warning)
    print(f"exported to {result.out_dir} (memory λ={result.lmbda:g}: {result.lmbda_source}{knn})")
    for name, size in result.files.items():
        print(f"  {name:<28} {size:>12,} bytes")
    print(
        "load it with: import mlpmem; from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})",
        file=sys.stderr,
    )
