"""Training checkpoints shared by train-lm and train-memory, and atomic ``save_pretrained``.

A checkpoint is ``STAGE/checkpoints/step-N/``: the model (``save_pretrained``, safetensors) and ``state.pt``
(optimizer state, RNG states as tensors, counters), loadable with ``torch.load(weights_only=True)``. The pointer
``latest.json`` (with the sha256 of every file of the checkpoint) is replaced atomically after both are written, so
a kill mid-save keeps the previous one; a resume refuses a checkpoint whose files no longer match their hashes.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model
from transformers import PreTrainedModel

from mlpmem.artifacts import atomic_write_json, check_inside, disk_errors, file_sha256, plain_name, read_json
from mlpmem.errors import UsageError
from mlpmem.training import non_finite_parameter


def rng_state() -> dict[str, torch.Tensor]:
    """The torch (and CUDA) RNG states as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(stage_dir: Path, step: int, model: PreTrainedModel, state: dict[str, Any]) -> None:
    """Write checkpoints/step-N/ (model + state with the RNG), point latest.json at it with the sha256 of each of
    its files, remove older ones. A write that fails (a full disk) leaves the previous checkpoint in charge."""
    root = Path(stage_dir) / "checkpoints"
    folder = root / f"step-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        with disk_errors(folder):
            model.save_pretrained(folder / "model")
            torch.save({"step": step, "rng": rng_state(), **state}, folder / "state.pt")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    files = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    atomic_write_json(root / "latest.json", {"step": step, "folder": folder.name, "files": files})
    for old in root.glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(stage_dir: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    """Load the latest checkpoint's weights into ``model`` and restore the RNG; returns its state, or None.

    Its files must match the hashes recorded when it was written, and its weights must fill every tensor of the
    model and nothing else: a damaged checkpoint is refused, never resumed from."""
    root = Path(stage_dir) / "checkpoints"
    if not (root / "latest.json").exists():
        return None
    folder = checked_checkpoint(root)
    try:
        missing, unexpected = load_model(model, folder / "model" / "model.safetensors", strict=False)
        state = torch.load(folder / "state.pt", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"refusing to resume from {folder / 'state.pt'}: it holds objects other than tensors and plain "
            f"values (not written by mlpmem); remove {root} to restart the stage from step 0"
        ) from None
    except (OSError, RuntimeError, SafetensorError, KeyError) as err:
        raise UsageError(
            f"the checkpoint in {folder} is damaged ({type(err).__name__}); remove {root} to restart the stage "
            "from step 0"
        ) from None
    if missing or unexpected:
        names = ", ".join(sorted(missing)[:3] + sorted(unexpected)[:3])
        raise UsageError(
            f"the checkpoint in {folder} does not fit the model ({len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected: {names}); remove {root} to restart the stage from step 0"
        )
    if (name := non_finite_parameter(model)) is not None:  # resumed, it would read as a diverged training
        raise UsageError(
            f"the checkpoint in {folder} holds nan/inf weights ({name}), so it cannot be resumed; "
            f"remove {root} to restart the stage from step 0"
        )
    set_rng_state(state["rng"])
    return state


def checked_checkpoint(root: Path) -> Path:
    """The folder latest.json names, once each of its files matches the sha256 recorded when it was written."""
    hint = f"remove {root} to restart the stage from step 0"
    try:
        latest = read_json(root / "latest.json")
        folder = root / plain_name(latest["folder"])
        files = {plain_name(name): str(digest) for name, digest in latest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{root / 'latest.json'} is damaged or lacks its file hashes; {hint}") from None
    for name, digest in files.items():
        path = folder / name
        check_inside(root, path, hint)
        if not path.is_file() or file_sha256(path) != digest:
            raise UsageError(
                f"the checkpoint in {folder} is damaged ({name} is missing or does not match the hash recorded "
                f"when it was written); {hint}"
            )
    return folder


def save_pretrained_atomically(model: PreTrainedModel, folder: Path, *extra: Any) -> None:
    """``save_pretrained`` of the model (and e.g. its tokenizer) into a temp folder, then rename into place."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(folder):
            for item in (model, *extra):
                item.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
