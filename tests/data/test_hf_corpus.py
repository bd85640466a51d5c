"""``--corpus hf:NAME[:CONFIG]``: a Hugging Face dataset streamed through the datasets library, here a local dataset
folder (no network), with and without its own splits."""

from __future__ import annotations

import json

import pytest

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.data.corpus import load_corpus
from mlpmem.errors import UsageError

pytest.importorskip("datasets")

LINES = {s: [f"{s} line {i} : the history of w{i} ." for i in range(40)] for s in ("train", "validation", "test")}


def write_dataset(folder, splits, column="text"):
    folder.mkdir()
    for split in splits:
        rows = "".join(json.dumps({column: line, "id": i}) + "\n" for i, line in enumerate(LINES[split]))
        (folder / f"{split}.jsonl").write_text(rows)
    return folder


def test_a_dataset_with_its_splits_is_streamed_split_by_split(tmp_path):
    corpus = load_corpus(f"hf:{write_dataset(tmp_path / 'ds', LINES)}")
    assert corpus.splits["train"] == "".join(line + "\n" for line in LINES["train"])
    assert corpus.splits["valid"].splitlines() == LINES["validation"]
    assert corpus.splits["test"].splitlines() == LINES["test"] and corpus.source.startswith("HF dataset")


def test_a_dataset_with_one_split_is_carved(tmp_path):
    corpus = load_corpus(f"hf:{write_dataset(tmp_path / 'ds', ['train'])}", valid_fraction=0.1, test_fraction=0.1)
    assert [len(corpus.splits[s].splitlines()) for s in ("train", "valid", "test")] == [32, 4, 4]
    assert "carved" in corpus.source


def test_a_missing_column_or_dataset_is_one_line(tmp_path, capsys):
    with pytest.raises(UsageError, match="no column 'text'"):
        load_corpus(f"hf:{write_dataset(tmp_path / 'ds', ['train'], column='body')}")
    code = main(
        [
            "prepare",
            "--corpus",
            f"hf:{tmp_path / 'nothing'}",
            "--train-tokenizer",
            "300",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot load Hugging Face dataset" in err


def test_prepare_reads_the_streamed_dataset(tmp_path):
    folder = write_dataset(tmp_path / "ds", LINES)
    run = tmp_path / "run"
    assert main(["prepare", "--corpus", f"hf:{folder}", "--train-tokenizer", "300", "--run-dir", str(run)]) == 0
    manifest = RunDir(run).require("prepare")
    assert manifest.source == f"HF dataset hf:{folder}" and manifest.split_tokens("valid") > 0
