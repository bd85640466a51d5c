"""Load a causal LM (HF id or path, or a run's trained LM) with a one-line error for a bad name.

A hub id is loaded online when the Hugging Face hub answers within ``HUB_TIMEOUT_S``, else from the local cache
in HF's offline mode: no minute of retries before the error when there is no network.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mlpmem.artifacts import RunDir, fingerprint_obj, fingerprint_path
from mlpmem.errors import UsageError
from mlpmem.manifests import TrainLMManifest
from mlpmem.training import non_finite_parameter


def run_lm_dir(run_dir: Path) -> Path:
    """The model folder written by ``mlpmem train-lm`` in a run (its files' sizes and hashes checked)."""
    RunDir(run_dir).require(TrainLMManifest)
    return RunDir(run_dir).file("train-lm", "model")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def require_model(name_or_path: str | Path, what: str = "model") -> str:
    """The name as text; UsageError when it is a local path that does not exist."""
    name = str(name_or_path)
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{what} path not found: {name}")
    return name


HUB_TIMEOUT_S = 3.0  # seconds a TCP connection to the hub (or the HTTPS proxy) may take before we go offline


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub ($HF_ENDPOINT, or the HTTPS proxy when one is set) accepts a connection (once per process)."""
    proxy = next(
        (os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)), None
    )
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except (OSError, ValueError):
        return False
    return True


def offline_unless_reachable(name: str) -> bool:
    """Before loading ``name``: for a hub id when the hub cannot be reached, switch HF to offline mode (the local
    cache only). True when loading is offline."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not _looks_local(name) and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # for child processes
        constants.HF_HUB_OFFLINE = True  # read by huggingface_hub and transformers at every call
    return bool(constants.HF_HUB_OFFLINE)


def load_error(what: str, name: str, err: Exception, offline: bool) -> UsageError:
    """One line for a model or tokenizer that could not be loaded."""
    if offline and not _looks_local(name):
        return UsageError(
            f"cannot load {what} {name!r}: the Hugging Face hub cannot be reached (offline) and it is not in the "
            "local cache; pass a local folder, or download it where there is network"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if what == "model":
        return UsageError(f"cannot load model {name!r} (not a local model folder or a reachable HF id): {first}")
    return UsageError(f"cannot load {what} {name!r}: {first}")


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


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """An HF tokenizer; UsageError naming it if it cannot be loaded."""
    name = require_model(name_or_path, "tokenizer")
    offline = offline_unless_reachable(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise load_error("tokenizer", name, err, offline) from None


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest context the model's positions allow (None when unbounded / unknown)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
