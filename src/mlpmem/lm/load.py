"""Load a causal LM (HF id or path, or a run's trained LM) with a one-line error for a bad name.

A hub id is loaded online when the Hugging Face hub answers, else from the local cache in HF's offline mode
(``mlpmem.hub``, which also loads tokenizers: no minute of retries before the error when there is no network).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from mlpmem.artifacts import RunDir, fingerprint_obj, fingerprint_path
from mlpmem.errors import UsageError
from mlpmem.hub import load_error, load_tokenizer, offline_unless_reachable, require_model  # noqa: F401 (public here)
from mlpmem.manifests import TrainLMManifest
from mlpmem.training import non_finite_parameter


def run_lm_dir(run_dir: Path) -> Path:
    """The model folder written by ``mlpmem train-lm`` in a run (its files' sizes and hashes checked)."""
    RunDir(run_dir).require(TrainLMManifest)
    return RunDir(run_dir).file("train-lm", "model")


def hub_revision(name: str) -> str | None:
    """The commit hash of hub model ``name`` as loading resolves it: the locally cached snapshot of its default
    branch, else the hub's answer (when reachable); None when neither knows it."""
    from huggingface_hub import model_info, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit hash>/config.json
    if offline_unless_reachable(name):
        return None
    try:
        return model_info(name).sha
    except Exception:  # noqa: BLE001 - any hub failure (no such repo, gated, network): the revision is unknown
        return None


def model_fingerprint(name_or_path: str | Path) -> str:
    """Identity of a model: content hash of a local folder, else the hub id with its resolved commit hash (an id
    alone would name every future revision of that model)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return fingerprint_path(path)
    return fingerprint_obj({"hub_id": str(name_or_path), "revision": hub_revision(str(name_or_path))})


def load_lm(name_or_path: str | Path, device: torch.device | str = "cpu") -> PreTrainedModel:
    """An HF causal LM in eval mode on ``device``; UsageError naming the model if it cannot be loaded."""
    name = require_model(name_or_path)
    offline = offline_unless_reachable(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except pickle.UnpicklingError:
        raise UsageError(
            f"refusing to load {name!r}: its weights are a pickle that is not plain tensors (convert it to safetensors)"
        ) from None
    except (OSError, ValueError) as err:
        raise load_error("model", name, err, offline) from None
    check_finite_weights(model, name)
    return model.to(device).eval()


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """UsageError when a loaded model holds nan/inf weights (a diverged or damaged model gives nan everywhere)."""
    if (param_name := non_finite_parameter(model)) is not None:
        raise UsageError(f"model {name!r} holds nan/inf weights ({param_name}); retrain it")


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest context the model's positions allow (None when unbounded / unknown)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
