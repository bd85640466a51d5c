"""Token stores: the prepared splits of a run as 1-D memmaps of token ids (see ``mlpmem prepare``).

Every reader checks the ids it reads against the vocabulary of what consumes them (``check_token_ids``, one
vectorised min/max per block as the block is read, never a second pass over a file): a corrupted id is one line
naming its file, not an ``IndexError`` deep inside the model or a silently wrong number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlpmem.artifacts import Manifest, RunDir
from mlpmem.errors import UsageError

SPLITS = ("train", "valid", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def open_split(run_dir: Path, split: str, prepare: Manifest | None = None) -> np.memmap:
    """Read-only token ids of one prepared split, shape [n_tokens]; UsageError (``--split``) when the run has no
    such split (``memory`` exists only for --corpus facts)."""
    run = RunDir(run_dir)
    prepare = prepare or run.require("prepare")
    if split not in prepare.arrays:
        raise UsageError(
            f"{run.path} has no {split} split (it has {', '.join(prepare.arrays)}; "
            "the memory split is written by `mlpmem prepare --corpus facts`)",
            field="split",
        )
    return run.array("prepare", split, prepare)


def tokenizer_dir(run_dir: Path) -> Path:
    """The prepared run's tokenizer folder (loadable with AutoTokenizer.from_pretrained)."""
    RunDir(run_dir).require("prepare")
    return RunDir(run_dir).file("prepare", "tokenizer")


def source_of(array: Any) -> Path | None:
    """The file a memmap (or a slice of one) reads, else None."""
    name = getattr(array, "filename", None)
    return Path(name) if name else None


def prepared_vocab_size(run: RunDir) -> int | None:
    """The vocabulary size the run's prepare stage recorded; None when it has no complete one (a synthetic run)."""
    manifest = run.read("prepare")
    return manifest.vocab_size if manifest is not None and manifest.complete else None


def check_token_ids(ids: Any, vocab_size: int | None, source: str | Path | None = None, lowest: int = 0) -> None:
    """UsageError unless every id of the block ``ids`` (numpy array or tensor, any shape) lies in
    [lowest, vocab_size) (``lowest`` -1: -1 pads; ``vocab_size`` None: nothing to check against). ``source``: the
    file the block was read from (its folder names the stage that wrote it); None for ids that come from no file
    (a tokenizer larger than the model)."""
    if vocab_size is None or (ids.size == 0 if isinstance(ids, np.ndarray) else ids.numel() == 0):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lowest <= lo and hi < vocab_size:
        return
    bad = hi if hi >= vocab_size else lo
    if source is None:
        raise UsageError(f"token id {bad} lies outside the model's vocabulary [0, {vocab_size})")
    folder = Path(source).parent
    raise UsageError(
        f"{source} holds token id {bad}, outside the vocabulary [0, {vocab_size}) (corrupted or replaced); "
        f"remove {folder} and rerun `mlpmem {folder.name}`"
    )
