"""Training checkpoints shared by train-lm and train-memory, and atomic ``save_pretrained``.

A checkpoint is ``STAGE/checkpoints/step-N/``: the model (``save_pretrained``, safetensors) and ``state.pt``
(optimizer state, RNG states as tensors, counters), loadable with ``torch.load(weights_only=True)``. The pointer
``latest.json`` is replaced atomically after both are written, so a kill mid-save keeps the previous one.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from mlpmem.artifacts import atomic_write_json, disk_errors, read_json
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
    """Write checkpoints/step-N/ (model + state with the RNG), point latest.json at it, remove older ones."""
    root = Path(stage_dir) / "checkpoints"
    folder = root / f"step-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    with disk_errors(folder):
        model.save_pretrained(folder / "model")
        torch.save({"step": step, "rng": rng_state(), **state}, folder / "state.pt")
    atomic_write_json(root / "latest.json", {"step": step, "folder": folder.name})
    for old in root.glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(stage_dir: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    """Load the latest checkpoint's weights into ``model`` and restore the RNG; returns its state, or None."""
    pointer = Path(stage_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    folder = pointer.parent / read_json(pointer)["folder"]
    try:
        model.load_state_dict(load_file(folder / "model" / "model.safetensors"), strict=False)
        state = torch.load(folder / "state.pt", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"refusing to resume from {folder / 'state.pt'}: it holds objects other than tensors and plain "
            "values (not written by mlpmem); remove the checkpoints folder to start afresh"
        ) from None
    except (OSError, RuntimeError, SafetensorError, KeyError) as err:
        raise UsageError(
            f"the checkpoint in {folder} is damaged ({type(err).__name__}); remove it to restart the stage"
        ) from None
    if (name := non_finite_parameter(model)) is not None:  # resumed, it would read as a diverged training
        raise UsageError(
            f"the checkpoint in {folder} holds nan/inf weights ({name}), so it cannot be resumed; "
            f"remove {folder.parent} to restart the stage"
        )
    set_rng_state(state["rng"])
    return state


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
