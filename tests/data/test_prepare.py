"""prepare: corpus sources, tokenizer training, token stores, bad input."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from mlpmem.artifacts import RunDir
from mlpmem.config import PrepareConfig, TrainLMConfig
from mlpmem.data.corpus import bundled_wikitext2, load_corpus
from mlpmem.data.prepare import prepare
from mlpmem.errors import UsageError


def test_bundled_slice_round_trips_through_the_trained_tokenizer(tmp_path):
    manifest = prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=400))
    assert manifest.status == "complete" and manifest.vocab_size == 400
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "prepare" / "tokenizer")
    text = bundled_wikitext2().splits["valid"]
    ids = RunDir(tmp_path).array("prepare", "valid")
    assert ids.dtype == np.uint16 and len(ids) == manifest.split_tokens("valid")
    assert tokenizer.decode(np.asarray(ids).tolist()) == text  # byte-level BPE is lossless


def test_rerun_with_same_config_does_nothing(tmp_path):
    first = prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=300))
    mtime = (tmp_path / "prepare" / "train.bin").stat().st_mtime_ns
    second = prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=300))
    assert second.fingerprint == first.fingerprint
    assert (tmp_path / "prepare" / "train.bin").stat().st_mtime_ns == mtime


def test_text_file_is_carved_deterministically(tmp_path):
    lines = [f"line {i} with some words\n" for i in range(200)]
    (tmp_path / "c.txt").write_text("".join(lines), encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "c.txt"), valid_fraction=0.1, test_fraction=0.05)
    assert corpus.splits["train"] + corpus.splits["valid"] + corpus.splits["test"] == "".join(lines)
    assert corpus.splits["test"] == "".join(lines[190:])
    assert corpus.splits["valid"] == "".join(lines[170:190])


def test_directory_with_split_files(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(f"{split} text\n", encoding="utf-8")
    corpus = load_corpus(str(tmp_path))
    assert corpus.splits == {"train": "train text\n", "valid": "valid text\n", "test": "test text\n"}


def write_source_tree(root):
    """A small code corpus: 30 Python files of different sizes in nested folders, plus files to leave out."""
    texts = {}
    for i in range(30):
        name = f"pkg{i % 3}/sub/mod_{i:02d}.py"
        texts[name] = "".join(f"def f_{i}_{j}(x):\n    return x + {j}\n" for j in range(5 + 7 * (i % 5)))
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "pkg0" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (root / "pkg1" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8
    (root / "README.md").write_text("# not code\n", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "index").write_bytes(b"\x00\x01")
    return texts


def test_directory_is_carved_by_whole_files_selected_by_glob(tmp_path, caplog):
    texts = write_source_tree(tmp_path)
    with caplog.at_level("WARNING"):
        corpus = load_corpus(str(tmp_path), valid_fraction=0.1, test_fraction=0.1, include=["*.py"])
    assert "skipped 1 of 31 files" in caplog.text and "pkg1/latin1.py" in caplog.text  # counted, not fatal
    owner = {}
    for split, text in corpus.splits.items():  # every split is whole files, each file in exactly one split
        names = [n for n in sorted(texts) if texts[n] in text]
        assert "".join(texts[n] for n in names) == text, split
        owner.update({n: split for n in names})
    assert sorted(owner) == sorted(texts) and "# not code" not in "".join(corpus.splits.values())
    total = sum(map(len, texts.values()))
    for split in ("valid", "test"):
        assert 0 < len(corpus.splits[split]) <= 0.1 * total
    again = load_corpus(str(tmp_path), valid_fraction=0.1, test_fraction=0.1, include=["pkg*/sub/*.py"])
    assert again.splits == corpus.splits  # deterministic; globs match the relative path too


def test_directory_without_text_or_matching_files_is_one_line(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UsageError, match="none of its 1 files is UTF-8 text"):
        load_corpus(str(tmp_path))
    with pytest.raises(UsageError, match=r"holds no files matching \*\.py") as err:
        load_corpus(str(tmp_path), include=["*.py"])
    assert err.value.field == "include"


def test_prepare_takes_include_from_the_cli(tmp_path, capsys):
    from mlpmem.cli import main

    write_source_tree(tmp_path / "src")
    argv = ["prepare", "--corpus", str(tmp_path / "src"), "--include", "*.py", "*.md", "--train-tokenizer", "300"]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 0
    manifest = RunDir(tmp_path / "run").read("prepare")
    assert manifest.config.include == ["*.py", "*.md"] and "carved by file" in manifest.source
    assert "skipped 1 of 32 files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,message",
    [(None, "corpus not found"), (b"", "empty"), (b"ok\n\xff\xfe bad\nmore\n", "not UTF-8")],
)
def test_bad_corpus_is_refused(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content if content else b"\n\n\n\n")
    with pytest.raises(UsageError, match=message):
        load_corpus(str(path))


def test_exactly_one_tokenizer_option_is_required():
    with pytest.raises(UsageError, match="exactly one of --tokenizer"):
        from mlpmem.config import validate

        validate(PrepareConfig, {"corpus": "wikitext-2-slice"})


def test_run_with_later_stages_is_not_reprepared_with_another_tokenizer(tmp_path):
    prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=300))
    prep = RunDir(tmp_path).require("prepare")
    RunDir(tmp_path).begin("train-lm", TrainLMConfig(), {"prepare": prep.fingerprint})  # a later stage, started
    with pytest.raises(UsageError, match="new --run-dir"):
        prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=320))


def test_a_killed_prepare_is_not_taken_for_a_later_stage(tmp_path):
    """A complete prepare and a killed re-prepare with another tokenizer (``prepare.partial``): the rerun is allowed."""
    prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=300))
    RunDir(tmp_path).begin("prepare", PrepareConfig(train_tokenizer=320), {})  # killed right after it began
    assert (tmp_path / "prepare.partial" / "manifest.json").is_file()
    manifest = prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=320))
    assert manifest.vocab_size == 320 and not (tmp_path / "prepare.partial").exists()


def test_an_edited_corpus_file_is_prepared_again_or_refused_under_later_stages(tmp_path, monkeypatch):
    """A local corpus's text is an input of prepare: an edit rebuilds it (no later stage) or is refused (a later
    stage was built from it) unless --replace; the same text is reused."""
    from mlpmem.data import prepare as prepare_module

    lines = bundled_wikitext2().splits["train"].splitlines(keepends=True)[:400]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(lines), encoding="utf-8")
    config = PrepareConfig(run_dir=tmp_path / "run", corpus=str(corpus), train_tokenizer=300)
    first = prepare(config)
    assert prepare(config).fingerprint == first.fingerprint  # the same text: reused
    corpus.write_text("".join(lines[:200] + ["an edited line\n"] + lines[200:]), encoding="utf-8")
    second = prepare(config)
    assert second.corpus_fingerprint != first.corpus_fingerprint
    assert second.split_tokens("train") > first.split_tokens("train")  # the edit is in the train split
    RunDir(config.run_dir).begin("train-lm", TrainLMConfig(), {"prepare": second.fingerprint})  # a later stage
    corpus.write_text("".join(lines[:300]), encoding="utf-8")
    with pytest.raises(
        UsageError, match=r"this prepare differs \(its input corpus\): use a new --run-dir, or --replace"
    ):
        prepare(config)
    assert RunDir(config.run_dir).read("prepare").fingerprint == second.fingerprint  # nothing lost
    assert prepare(config.model_copy(update={"replace": True})).split_tokens("train") < first.split_tokens("train")
    # a run prepared before the text was an input (inputs {}) with the same text is reused, not rebuilt
    old_run = config.model_copy(update={"run_dir": tmp_path / "old"})
    monkeypatch.setattr(prepare_module, "corpus_inputs", lambda run, corpus: {})
    old = prepare(old_run)
    monkeypatch.undo()
    assert prepare(old_run).fingerprint == old.fingerprint and old.inputs == {}
