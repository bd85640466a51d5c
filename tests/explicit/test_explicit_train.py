"""train-explicit on a tiny run: the retrieval of every training chunk (its own text excluded, no future), both
models trained and saved, and a killed stage resumed to the same weights."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlpmem.artifacts import RunDir
from mlpmem.config import TrainExplicitConfig
from mlpmem.explicit import train as train_mod
from mlpmem.explicit.model import ExplicitMemoryLM
from mlpmem.explicit.retriever import BM25_DIR, BM25Retriever
from mlpmem.lm.load import load_lm

from explicit_inputs import CONFIG, memory_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained run (one torch thread, as the function-scoped tests use: the sums' order decides the last bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = memory_run(tmp_path_factory.mktemp("explicit") / "run")
        return path, train_mod.train_explicit(TrainExplicitConfig(run_dir=path, **CONFIG))
    finally:
        torch.set_num_threads(before)


def check_own_reference_excluded(run: RunDir) -> None:
    refs = run.array("train-explicit", "chunk_refs")
    train = np.asarray(run.array("prepare", "train"), dtype=np.int64)
    retriever = BM25Retriever.load(run.file("references", BM25_DIR))
    assert refs[0] == -1 and (refs[1:] >= 0).all()
    for c in range(1, len(refs)):
        own = (c * 16) // 32  # the 32-token reference holding the 16-token chunk
        assert refs[c] != own
        ranked = [r for r in retriever.search([train[c * 16 - 16 : c * 16]], 4)[0] if r != own]
        assert refs[c] == ranked[0]


def test_each_chunk_retrieves_with_the_tokens_before_it_and_never_its_own_reference(trained):
    path, manifest = trained
    check_own_reference_excluded(RunDir(path))


def test_references_of_the_memory_split_exclude_a_chunks_own_text_too(tmp_path):
    """The memory split (--corpus facts) starts with the train tokens: a training chunk's own reference is there."""
    path = memory_run(tmp_path / "run", split="memory", n_memory=400)
    train_mod.train_explicit(TrainExplicitConfig(run_dir=path, **{**CONFIG, "max_steps": 1, "control": False}))
    run = RunDir(path)
    assert run.require("references").references == (1200 + 400) // 32  # more references than train alone holds
    check_own_reference_excluded(run)


def test_both_models_are_trained_from_the_warm_up_lm(trained):
    path, manifest = trained
    lm = load_lm(path / "train-lm" / "model")
    model = ExplicitMemoryLM.from_pretrained(path / "train-explicit" / "model")
    control = ExplicitMemoryLM.from_pretrained(path / "train-explicit" / "control")
    assert model.config.memory_layers == [0] and model.config.keep_tokens == 4
    w = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(model.state_dict()[w], lm.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], control.state_dict()[w])  # memory changed what was learnt
    steps = [h["step"] for h in manifest.history]
    assert steps == [2, 4] and all("model_valid_loss" in h and "control_valid_loss" in h for h in manifest.history)
    assert 0 < manifest.history[-1]["model_memory_mass"] < 1


class Killed(Exception):
    pass


def test_a_killed_training_resumes_to_the_same_weights(trained, tmp_path, monkeypatch):
    path, _ = trained
    killed = memory_run(tmp_path / "run")
    real, calls = train_mod.window_loss, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 + 1:  # the 4th step (validation at step 2 calls it once more)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "window_loss", dying)
    with pytest.raises(Killed):
        train_mod.train_explicit(TrainExplicitConfig(run_dir=killed, **CONFIG))
    monkeypatch.setattr(train_mod, "window_loss", real)
    train_mod.train_explicit(TrainExplicitConfig(run_dir=killed, **CONFIG))
    for name in ("model", "control"):
        a = load_file(killed / "train-explicit" / name / "model.safetensors")
        b = load_file(path / "train-explicit" / name / "model.safetensors")
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name


def test_a_chunk_longer_than_the_window_is_one_line(tmp_path, capsys):
    """--chunk-tokens beyond the window (the LM's context 64 here) is refused before any work, naming the flag."""
    from mlpmem.cli import main

    path = memory_run(tmp_path / "run")
    capsys.readouterr()
    argv = ["train-explicit", "--run-dir", str(path), "--device", "cpu", "--dtype", "float32", "--max-steps", "1"]
    assert main([*argv, "--chunk-tokens", "65"]) == 2
    err = capsys.readouterr().err
    assert "--chunk-tokens: chunk_tokens (65) exceeds the training window (64 tokens)" in err and err.count("\n") == 1
    assert not (path / "train-explicit.partial").exists() and not (path / "train-explicit").exists()
    assert main([*argv, "--chunk-tokens", "64", "--eval-batches", "1"]) == 0  # a window of one whole chunk is fine


@pytest.mark.parametrize("split", ["train", "valid"])
def test_an_id_outside_the_vocabulary_is_one_line_naming_its_file(tmp_path, split, bit_rot):
    """prepare/SPLIT.bin damaged after prepare completed (after the references were cut): the retrieval of the
    training chunks (train) or the first validation (valid) names the file, not an IndexError in the LM."""
    from mlpmem.errors import UsageError

    path = memory_run(tmp_path / "run")
    tokens = np.memmap(path / "prepare" / f"{split}.bin", dtype=np.uint16, mode="r+")
    tokens[3::40] = 777
    tokens.flush()
    with pytest.raises(UsageError) as err:
        train_mod.train_explicit(TrainExplicitConfig(run_dir=path, **CONFIG))
    message = err.value.for_cli()
    assert "\n" not in message
    assert message.startswith(f"{path / 'prepare' / f'{split}.bin'} holds token id 777, outside the vocabulary [0, 96)")
    assert not (path / "train-explicit").exists()
