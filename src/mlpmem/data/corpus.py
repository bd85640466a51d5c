"""Corpus sources: the bundled WikiText-2 slice, full WikiText-2 from shared/data, local text, HF datasets.

Every source yields its text as three splits (train/valid/test). A source without splits is carved
deterministically: a directory by whole files (``carve_documents``), one text by lines (the last
``test_fraction`` for test, the ``valid_fraction`` before it for valid).
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path

from mlpmem.errors import UsageError

log = logging.getLogger(__name__)
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
    """Split one text by lines: train first, then valid, then test (deterministic)."""
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


@dataclass
class Document:
    """One file of a corpus directory: its path relative to the directory, and its text."""

    name: str
    text: str


def join_documents(docs: list[Document]) -> str:
    """Documents in name order, each ending with a newline."""
    return "".join(d.text if d.text.endswith("\n") else d.text + "\n" for d in sorted(docs, key=lambda d: d.name))


def carve_documents(docs: list[Document], valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split whole documents: in an order fixed by a hash of each name, a document goes to test while test stays
    within ``test_fraction`` of the characters, else to valid within ``valid_fraction``, else to train; an empty
    valid or test split takes the smallest train document. No document is cut in two."""
    if len(docs) < 3:
        return carve(join_documents(docs), valid_fraction, test_fraction)
    total = sum(len(d.text) for d in docs)
    target = {"test": test_fraction * total, "valid": valid_fraction * total}
    parts: dict[str, list[Document]] = {"train": [], "valid": [], "test": []}
    size = {"valid": 0, "test": 0}  # characters so far
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest()):
        split = next((s for s in ("test", "valid") if size[s] + len(doc.text) <= target[s]), "train")
        parts[split].append(doc)
        if split in size:
            size[split] += len(doc.text)
    for split in ("test", "valid"):
        if not parts[split] and len(parts["train"]) > 1:
            smallest = min(parts["train"], key=lambda d: (len(d.text), d.name))
            parts["train"].remove(smallest)
            parts[split].append(smallest)
    return {split: join_documents(d) for split, d in parts.items()}


def corpus_files(path: Path, include: list[str] | None) -> list[Path]:
    """The files of a corpus directory (hidden files and folders skipped), those matching an ``include`` glob
    (against the relative path or the file name) when globs are given; UsageError when none is left."""
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if include:
        files = [
            p
            for p in files
            if any(fnmatchcase(p.relative_to(path).as_posix(), g) or fnmatchcase(p.name, g) for g in include)
        ]
    if not files:
        matching = f" matching {' '.join(include)}" if include else ""
        raise UsageError(f"corpus directory {path} holds no files{matching}", field="include" if include else None)
    return files


def read_documents(path: Path, files: list[Path]) -> list[Document]:
    """The UTF-8 text of each file; binary (NUL bytes) and non-UTF-8 files are skipped with one warning that
    counts them. UsageError when no file is text."""
    docs, skipped = [], []
    for file in files:
        data = file.read_bytes()
        try:
            if b"\x00" in data:
                raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
            docs.append(Document(file.relative_to(path).as_posix(), data.decode("utf-8")))
        except UnicodeDecodeError:
            skipped.append(file.relative_to(path).as_posix())
    if not docs:
        raise UsageError(
            f"corpus directory {path}: none of its {len(files)} files is UTF-8 text; select text files with --include"
        )
    if skipped:
        log.warning(
            "corpus %s: skipped %d of %d files that are binary or not UTF-8 (e.g. %s); select files with --include",
            path,
            len(skipped),
            len(files),
            ", ".join(skipped[:3]),
        )
    return docs


def local_corpus(path: Path, valid_fraction: float, test_fraction: float, include: list[str] | None = None) -> Corpus:
    """A text file (carved by lines), or a directory: files named train*/valid*/test* give the splits, else whole
    files are carved into splits (``carve_documents``)."""
    if path.is_file():
        if include:
            raise UsageError(f"selects files in a corpus directory; {path} is a file", field="include")
        return Corpus(carve(read_text(path), valid_fraction, test_fraction), f"text file {path}")
    files = corpus_files(path, include)
    docs = read_documents(path, files)
    named = {
        s: [d for d in docs if Path(d.name).name.startswith(("validation", "valid") if s == "valid" else s)]
        for s in SPLITS
    }
    if all(named.values()):
        splits = {s: "".join(d.text for d in sorted(named[s], key=lambda d: d.name)) for s in SPLITS}
        return Corpus(splits, f"text directory {path} (train/valid/test files)")
    return Corpus(
        carve_documents(docs, valid_fraction, test_fraction),
        f"text directory {path} ({len(docs)} text files of {len(files)}, carved by file)",
    )


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
    source: str,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    text_column: str = "text",
    include: list[str] | None = None,
) -> Corpus:
    """Resolve a --corpus value to text splits; UsageError for a missing, empty or non-UTF-8 corpus."""
    if source == "facts":
        raise UsageError(
            "the facts corpus is generated by `mlpmem prepare --corpus facts` from its settings; "
            "use that run's prepared splits (e.g. --split memory)"
        )
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
        corpus = local_corpus(path, valid_fraction, test_fraction, include)
    for split, text in corpus.splits.items():
        if not text.strip():
            raise UsageError(f"corpus {source}: the {split} split is empty")
    return corpus
