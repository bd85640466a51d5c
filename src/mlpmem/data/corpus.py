"""Corpus sources: the bundled WikiText-2 slice, full WikiText-2 from shared/data, local text, HF datasets.

Every source yields its text as three splits (train/valid/test); a source without splits is carved
deterministically by lines: the last ``test_fraction`` for test, the ``valid_fraction`` before it for valid.
"""

from __future__ import annotations

import lzma
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mlpmem.errors import UsageError

SPLITS = ("train", "valid", "test")
SHARED_ENV = "MLPMEM_WIKITEXT2_DIR"


@dataclass
class Corpus:
    """Text per split and a description of where it came from."""

    splits: dict[str, str]
    source: str


def bundled_wikitext2() -> Corpus:
    """The <= 1 MB WikiText-2 slice shipped in the package (CC BY-SA 3.0, see its ATTRIBUTION.md)."""
    folder = resources.files("mlpmem.data") / "bundled" / "wikitext-2"
    return Corpus({s: (folder / f"{s}.txt").read_text(encoding="utf-8") for s in SPLITS}, "bundled WikiText-2 slice")


def find_wikitext2_dir() -> Path | None:
    """The full WikiText-2 (v1, xz) folder: $MLPMEM_WIKITEXT2_DIR, or shared/data/wikitext-2-v1 near the cwd."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        for candidate in (
            folder / "shared" / "data" / "wikitext-2-v1",
            folder.parent / "shared" / "data" / "wikitext-2-v1",
        ):
            if (candidate / "wiki.train.tokens.xz").exists():
                return candidate
    return None


def full_wikitext2() -> Corpus:
    folder = find_wikitext2_dir()
    if folder is None:
        raise UsageError(
            f"full WikiText-2 not found (looked for shared/data/wikitext-2-v1 and ${SHARED_ENV}); "
            "use --corpus wikitext-2-slice or hf:wikitext:wikitext-2-v1"
        )
    names = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
    splits = {}
    for split, name in names.items():
        path = folder / f"{name}.xz"
        splits[split] = lzma.open(path, "rt", encoding="utf-8").read() if path.exists() else read_text(folder / name)
    return Corpus(splits, f"WikiText-2 from {folder}")


def read_text(path: Path) -> str:
    """A UTF-8 text file, or UsageError naming the file (missing, not UTF-8)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"corpus file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise UsageError(
            f"corpus file {path} is not UTF-8 (bad byte at offset {err.start}); re-encode it as UTF-8"
        ) from None


def carve(text: str, valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split text by lines: train first, then valid, then test (deterministic)."""
    lines = text.splitlines(keepends=True)
    if len(lines) < 3:
        raise UsageError("corpus has fewer than 3 lines; cannot carve train/valid/test splits")
    n_test = max(1, int(len(lines) * test_fraction))
    n_valid = max(1, int(len(lines) * valid_fraction))
    n_train = len(lines) - n_valid - n_test
    return {
        "train": "".join(lines[:n_train]),
        "valid": "".join(lines[n_train : n_train + n_valid]),
        "test": "".join(lines[n_train + n_valid :]),
    }


def local_corpus(path: Path, valid_fraction: float, test_fraction: float) -> Corpus:
    """A text file (carved), or a directory: files named train*/valid*/test* give the splits, else all are carved."""
    if path.is_file():
        return Corpus(carve(read_text(path), valid_fraction, test_fraction), f"text file {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UsageError(f"corpus directory {path} holds no files")
    named = {
        s: [f for f in files if f.name.startswith(s) or f.name.startswith("validation" if s == "valid" else s)]
        for s in SPLITS
    }
    if all(named.values()):
        splits = {s: "".join(read_text(f) for f in named[s]) for s in SPLITS}
        return Corpus(splits, f"text directory {path} (train/valid/test files)")
    texts = [read_text(f) for f in files]
    text = "".join(t if t.endswith("\n") else t + "\n" for t in texts)
    return Corpus(carve(text, valid_fraction, test_fraction), f"text directory {path} ({len(files)} files, carved)")


def hf_corpus(spec: str, text_column: str, valid_fraction: float, test_fraction: float) -> Corpus:
    """``hf:NAME[:CONFIG]`` streamed through the datasets library (rows are read as they arrive: nothing is
    downloaded into the datasets cache first). NAME is a Hub dataset (needs network) or a local dataset folder."""
    try:
        import datasets
    except ImportError:
        raise UsageError("hf: corpora need the datasets package: pip install 'mlpmem[hf]'") from None
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, streaming=True)
        first = next(iter(ds[next(iter(ds))]), {})
    except Exception as err:  # datasets raises many types for an unknown or unreachable name
        raise UsageError(
            f"cannot load Hugging Face dataset {spec!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if text_column not in first:
        raise UsageError(
            f"dataset {spec} has no column {text_column!r} (it has {', '.join(first)})", field="text_column"
        )
    join = lambda split: "".join(f"{row[text_column]}\n" for row in ds[split])  # noqa: E731
    if {"train", "validation", "test"} <= set(ds):
        return Corpus({"train": join("train"), "valid": join("validation"), "test": join("test")}, f"HF dataset {spec}")
    return Corpus(carve(join(next(iter(ds))), valid_fraction, test_fraction), f"HF dataset {spec} (carved)")


def load_corpus(
    source: str, valid_fraction: float = 0.05, test_fraction: float = 0.05, text_column: str = "text"
) -> Corpus:
    """Resolve a --corpus value to text splits; UsageError for a missing, empty or non-UTF-8 corpus."""
    if source == "wikitext-2-slice":
        corpus = bundled_wikitext2()
    elif source == "wikitext-2":
        corpus = full_wikitext2()
    elif source.startswith("hf:"):
        corpus = hf_corpus(source, text_column, valid_fraction, test_fraction)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UsageError(
                f"corpus not found: {source} (a text file, a directory, wikitext-2, wikitext-2-slice or hf:NAME)"
            )
        corpus = local_corpus(path, valid_fraction, test_fraction)
    for split, text in corpus.splits.items():
        if not text.strip():
            raise UsageError(f"corpus {source}: the {split} split is empty")
    return corpus
