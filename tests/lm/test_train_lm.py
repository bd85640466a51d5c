"""train-lm: a loadable HF checkpoint, kill-and-resume equals uninterrupted, bad input."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlpmem.config import PrepareConfig, TrainLMConfig
from mlpmem.data.prepare import prepare
from mlpmem.errors import UsageError
from mlpmem.lm import train as train_module
from mlpmem.lm.train import lr_factor, train_lm

TINY = dict(n_layer=1, n_head=2, n_embd=32, context=32, batch_size=4, max_steps=6, eval_interval=2,
            eval_batches=2, warmup_steps=2, dtype="float32", device="cpu")


@pytest.fixture
def prepared(tmp_path):
    prepare(PrepareConfig(run_dir=tmp_path / "run", train_tokenizer=300))
    return tmp_path / "run"


def weights(run_dir):
    return load_file(run_dir / "lm" / "model" / "model.safetensors")


def test_trained_model_loads_with_auto_class_and_learns(prepared):
    manifest = train_lm(TrainLMConfig(run_dir=prepared, **{**TINY, "max_steps": 30, "eval_interval": 10, "lr": 3e-3}))
    model = AutoModelForCausalLM.from_pretrained(prepared / "lm" / "model")
    assert model.config.n_positions == 32 and model.config.vocab_size == 300
    history = manifest["history"]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert manifest["model_fingerprint"] and manifest["train_tokens_per_s"] > 0


def test_killed_and_resumed_training_equals_uninterrupted(prepared, tmp_path, monkeypatch):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    train_lm(TrainLMConfig(run_dir=other, **TINY))

    real_save = train_module.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # killed right after the step-4 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert not (prepared / "lm" / "model").exists()  # nothing that looks complete
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    manifest = train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert manifest["status"] == "complete"
    a, b = weights(prepared), weights(other)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_complete_stage_is_skipped(prepared):
    first = train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert train_lm(TrainLMConfig(run_dir=prepared, **TINY))["fingerprint"] == first["fingerprint"]


def test_continue_training_refuses_another_tokenizer(prepared, tmp_path):
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    other = tmp_path / "other"
    prepare(PrepareConfig(run_dir=other, train_tokenizer=320))
    with pytest.raises(UsageError, match="another tokenizer"):
        train_lm(TrainLMConfig(run_dir=other, model=str(prepared / "lm" / "model"), **TINY))


def test_continue_training_refuses_context_beyond_positions(prepared, tmp_path):
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    import shutil

    again = tmp_path / "again"
    shutil.copytree(prepared / "prepare", again / "prepare")
    with pytest.raises(UsageError, match="exceeds"):
        train_lm(TrainLMConfig(run_dir=again, model=str(prepared / "lm" / "model"), **{**TINY, "context": 64}))


def test_missing_model_path_is_a_usage_error(prepared):
    with pytest.raises(UsageError, match="not found"):
        train_lm(TrainLMConfig(run_dir=prepared, model="./no/such/model", **TINY))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
