"""Token stores: the prepared splits of a run as 1-D memmaps of token ids (see ``mlpmem prepare``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.artifacts import RunDir

SPLITS = ("train", "valid", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def open_split(run_dir: Path, split: str) -> np.memmap:
    """Read-only token ids of one prepared split, shape [n_tokens]."""
    return RunDir(run_dir).array("prepare", split)


def tokenizer_dir(run_dir: Path) -> Path:
    """The prepared run's tokenizer folder (loadable with AutoTokenizer.from_pretrained)."""
    RunDir(run_dir).require("prepare")
    return RunDir(run_dir).file("prepare", "tokenizer")
