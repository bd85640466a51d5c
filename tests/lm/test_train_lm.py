"""train-lm: a loadable HF checkpoint, kill-and-resume equals uninterrupted, divergence stops, bad input."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mlpmem.artifacts import RunDir
from mlpmem.config import PrepareConfig, TrainLMConfig
from mlpmem.data.prepare import prepare
from mlpmem.errors import UsageError
from mlpmem.lm import train as train_module
from mlpmem.lm.load import load_lm
from mlpmem.lm.train import train_lm
from mlpmem.training import MetricsLog, checkpoint_due, lr_factor, make_optimizer, make_scheduler

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    context=32,
    batch_size=4,
    max_steps=6,
    eval_interval=2,
    eval_batches=2,
    warmup_steps=2,
    dtype="float32",
    device="cpu",
)


@pytest.fixture
def prepared(tmp_path):
    prepare(PrepareConfig(run_dir=tmp_path / "run", train_tokenizer=300))
    return tmp_path / "run"


def weights(run_dir):
    return load_file(run_dir / "train-lm" / "model" / "model.safetensors")


def test_trained_model_loads_with_auto_class_and_learns(prepared):
    manifest = train_lm(TrainLMConfig(run_dir=prepared, **{**TINY, "max_steps": 30, "eval_interval": 10, "lr": 3e-3}))
    model = AutoModelForCausalLM.from_pretrained(prepared / "train-lm" / "model")
    assert model.config.n_positions == 32 and model.config.vocab_size == 300
    history = manifest.history
    assert [h["step"] for h in history] == [10, 20, 30]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert manifest.valid_loss == history[-1]["valid_loss"] and manifest.steps == 30
    assert manifest.model_fingerprint and manifest.train_tokens_per_s > 0
    assert manifest.parameters == sum(p.numel() for p in model.parameters())
    assert manifest.inputs == {"prepare": RunDir(prepared).read("prepare").fingerprint}
    assert not (prepared / "train-lm" / "checkpoints").exists() and not (prepared / "train-lm.partial").exists()


def test_killed_and_resumed_training_equals_uninterrupted(prepared, tmp_path, monkeypatch):
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
    assert not (prepared / "train-lm").exists()  # nothing that looks complete
    assert (prepared / "train-lm.partial" / "checkpoints" / "step-4").is_dir()
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    manifest = train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert manifest.status == "complete"
    a, b = weights(prepared), weights(other)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert manifest.history == RunDir(other).read("train-lm").history
    assert metric_lines(prepared) == metric_lines(other)  # no step written twice, none lost


def metric_lines(run_dir):
    """metrics.jsonl without its timings: (step, every name, the losses and lr)."""
    records = MetricsLog.read(run_dir / "train-lm" / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} | {"names": sorted(r)} for r in records]


def test_metrics_file_has_training_and_validation_lines(prepared):
    manifest = train_lm(TrainLMConfig(run_dir=prepared, **{**TINY, "max_steps": 12, "eval_interval": 4}))
    records = MetricsLog.read(prepared / "train-lm" / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    valid = [r for r in records if "valid/loss" in r]
    assert [r["step"] for r in train] == [4, 8, 10, 12]  # every 10 steps, every checkpoint, the last step
    assert all(r["train/tokens_per_s"] > 0 and r["train/lr"] > 0 for r in train)
    assert [(r["step"], r["valid/loss"]) for r in valid] == [
        (h["step"], pytest.approx(h["valid_loss"], abs=1e-4)) for h in manifest.history
    ]
    assert "metrics.jsonl" not in manifest.files  # a log, not content: timings differ between identical runs


def test_kill_after_the_final_checkpoint_resumes_at_the_end(prepared, tmp_path, monkeypatch):
    """Killed after the last step's checkpoint but before the stage completes: the rerun trains no step."""
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    train_lm(TrainLMConfig(run_dir=other, **TINY))

    real_complete = train_module.StageBuild.complete

    def die(self, **fields):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.StageBuild, "complete", die)
    with pytest.raises(KeyboardInterrupt):
        train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert (prepared / "train-lm.partial" / "checkpoints" / "step-6").is_dir()
    monkeypatch.setattr(train_module.StageBuild, "complete", real_complete)
    steps = []
    real_loss = train_module.window_loss
    monkeypatch.setattr(train_module, "window_loss", lambda m, x: steps.append(m.training) or real_loss(m, x))
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert not any(steps)  # only validation batches (eval mode): no training step ran again
    a, b = weights(prepared), weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_after_the_complete_manifest_swaps_the_build_in_without_training(prepared, monkeypatch):
    """Killed once train-lm.partial/ holds its complete manifest, before the swap: the rerun swaps it in (under the
    run's lock) and trains nothing; the model is the one the killed command finished."""

    def killed(self, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    monkeypatch.undo()
    assert not (prepared / "train-lm").exists()
    finished = load_file(prepared / "train-lm.partial" / "model" / "model.safetensors")
    ran = []
    monkeypatch.setattr(train_module, "window_loss", lambda m, x: ran.append(1))
    manifest = train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert not ran and manifest.status == "complete" and manifest.steps == 6
    a = weights(prepared)
    assert a.keys() == finished.keys() and all(torch.equal(a[k], finished[k]) for k in a)
    assert not (prepared / "train-lm.partial").exists() and not (prepared / ".train-lm.old").exists()


def test_a_damaged_checkpoint_is_refused_and_removing_it_restarts_from_step_0(prepared, tmp_path, monkeypatch):
    """Flipped bytes in the weights of the checkpoint a killed train-lm left: the resume refuses them in one line
    (before, it resumed to 'complete' from the damaged weights); the hint's removal gives the uninterrupted run."""
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    train_lm(TrainLMConfig(run_dir=other, **TINY))
    real_save = train_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    monkeypatch.undo()
    checkpoints = prepared / "train-lm.partial" / "checkpoints"
    path = checkpoints / "step-2" / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:-32] = bytes(32)
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=rf"damaged .*remove {checkpoints} to restart the stage from step 0"):
        train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert not (prepared / "train-lm").exists()
    shutil.rmtree(checkpoints)
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    a, b = weights(prepared), weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes(prepared, tmp_path, monkeypatch, capsys):
    """torch's checkpoint write fails as on a full disk ('unexpected pos', a RuntimeError) at step 4: exit 2 with
    one line, the step-2 checkpoint still in charge; the rerun equals an uninterrupted run."""
    from mlpmem.cli import main

    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    train_lm(TrainLMConfig(run_dir=other, **TINY))
    real_save, saves = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 11904 vs 11792")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["-q", "train-lm", "--run-dir", str(prepared), "--threads=1", *flags]) == 2  # as the fixture
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlpmem: error: no space left writing") and "step-4" in err[0]
    monkeypatch.undo()
    checkpoints = prepared / "train-lm.partial" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-2"]
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    a, b = weights(prepared), weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_complete_stage_is_skipped(prepared):
    first = train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    assert train_lm(TrainLMConfig(run_dir=prepared, **TINY)).fingerprint == first.fingerprint
    # a setting (device) is not part of the stage's identity
    assert train_lm(TrainLMConfig(run_dir=prepared, **{**TINY, "device": "auto"})).fingerprint == first.fingerprint


@pytest.mark.parametrize("bad", [{"lr": 1e3}, {"weight_decay": 1e10}])
def test_diverging_training_stops_and_marks_nothing_complete(prepared, bad):
    with pytest.raises(UsageError, match="diverged|nan") as err:
        train_lm(TrainLMConfig(run_dir=prepared, **{**TINY, "warmup_steps": 0, **bad}))
    assert "\n" not in str(err.value)
    assert not (prepared / "train-lm").exists()
    assert (prepared / "train-lm.partial").is_dir()
    assert RunDir(prepared).read("train-lm", prepared / "train-lm.partial").status == "running"


def test_infinite_lr_is_refused_by_the_config():
    from mlpmem.config import validate

    with pytest.raises(UsageError, match="--lr"):
        validate(TrainLMConfig, {"lr": float("inf")})


def test_continue_training_refuses_another_tokenizer(prepared, tmp_path):
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    other = tmp_path / "other"
    prepare(PrepareConfig(run_dir=other, train_tokenizer=320))
    with pytest.raises(UsageError, match="another tokenizer"):
        train_lm(TrainLMConfig(run_dir=other, model=str(prepared / "train-lm" / "model"), **TINY))


def test_continue_training_refuses_context_beyond_positions(prepared, tmp_path):
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    again = tmp_path / "again"
    shutil.copytree(prepared / "prepare", again / "prepare")
    with pytest.raises(UsageError, match="exceeds") as err:
        train_lm(TrainLMConfig(run_dir=again, model=str(prepared / "train-lm" / "model"), **{**TINY, "context": 64}))
    assert err.value.field == "context"
    assert not (again / "train-lm.partial").exists() and not (again / "train-lm").exists()  # refused before any write


def test_missing_model_path_is_a_usage_error(prepared):
    with pytest.raises(UsageError, match="not found"):
        train_lm(TrainLMConfig(run_dir=prepared, model="./no/such/model", **TINY))


def test_model_with_nan_weights_is_refused(prepared, tmp_path):
    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    broken = tmp_path / "broken"
    shutil.copytree(prepared / "train-lm" / "model", broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(k for k in tensors if k.endswith("ln_f.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="nan") as err:
        load_lm(broken)
    assert "\n" not in str(err.value) and "ln_f" in str(err.value)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_a_token_id_outside_the_vocabulary_is_one_line_naming_its_file(prepared, split, bit_rot):
    """prepare/SPLIT.bin damaged after prepare completed (bit rot: a read does not rehash it): every 20th id
    is 65000, beyond the 300-token vocabulary, so the first batch (train) or validation (valid) reads one."""
    import numpy as np

    path = prepared / "prepare" / f"{split}.bin"
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    tokens[::20] = 65000
    tokens.flush()
    with pytest.raises(UsageError) as err:
        train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    message = err.value.for_cli()
    assert "\n" not in message and message.startswith(f"{path} holds token id 65000, outside the vocabulary [0, 300)")
    assert message.endswith(f"remove {prepared / 'prepare'} and rerun `mlpmem prepare`")
    assert not (prepared / "train-lm").exists()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_scheduler_follows_lr_factor_and_checkpoints_include_the_last_step():
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, lr=2.0, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # matrices decayed, biases not
    scheduler = make_scheduler(optimizer, warmup_steps=4, total_steps=20, min_ratio=0.1)
    for step in range(25):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor(step, 4, 20, 0.1)), step
        optimizer.step()
        scheduler.step()
    assert [s for s in range(1, 24) if checkpoint_due(s, 5, 23)] == [5, 10, 15, 20, 23]


def test_architecture_presets_have_the_gpt2_parameter_count():
    """wt2-mom and wt2-gated-deltanet are sized to the wt2 GPT-2 (within 1%), with the sizes they declare."""
    from mlpmem.presets import load_pipeline

    def model_of(preset):
        config = TrainLMConfig(**load_pipeline(preset)["train_lm"], run_dir="unused")
        return train_module.build_model(config, vocab_size=8192, prepared_tokenizer_fp="unused")

    gpt2 = sum(p.numel() for p in model_of("wt2").parameters())
    for preset, arch in (("wt2-mom", "mom"), ("wt2-gated-deltanet", "gated-deltanet")):
        model = model_of(preset)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n / gpt2 - 1) < 0.01, (preset, n, gpt2)
        assert model.config.is_gated_deltanet == (arch == "gated-deltanet")
        sizes = load_pipeline(preset)["train_lm"]
        assert model.config.head_k_dim == sizes["head_dim"] and model.config.intermediate_size == sizes["ffn_size"]


def test_head_dim_is_refused_for_a_gpt2(prepared):
    with pytest.raises(UsageError, match="head-dim applies to arch mom"):
        train_lm(TrainLMConfig(run_dir=prepared, n_embd=32, n_head=2, head_dim=8, max_steps=1))


def test_a_finished_lm_that_later_stages_used_is_not_replaced_without_replace(prepared, capsys):
    """Like prepare: another config (here another architecture and size) is refused, in one line naming what
    differs, while a later stage was built from the finished LM; --replace rebuilds it."""
    from mlpmem.cli import main
    from mlpmem.config import DatastoreConfig

    first = train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    RunDir(prepared).begin("datastore", DatastoreConfig(), {"train-lm": first.fingerprint})  # a later stage
    before = weights(prepared)
    capsys.readouterr()
    argv = ["train-lm", "--run-dir", str(prepared), *(f"--{k}={v}" for k, v in TINY.items())]
    assert main([*argv, "--arch", "gated-deltanet", "--n-head", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a finished train-lm that datastore was built from" in err
    assert "differs (--arch, --n-head): use a new --run-dir, or --replace to rebuild it" in err
    assert RunDir(prepared).read("train-lm").fingerprint == first.fingerprint
    assert all(torch.equal(before[k], weights(prepared)[k]) for k in before)  # nothing lost
    assert main([*argv, "--max-steps", "7", "--replace"]) == 0
    assert RunDir(prepared).read("train-lm").steps == 7


def test_continuing_from_a_folder_whose_weights_changed_trains_again(prepared, tmp_path):
    """A local --model folder's content is an input: the LM is not 'reused' after the folder's weights change."""
    from mlpmem.lm.load import model_fingerprint

    train_lm(TrainLMConfig(run_dir=prepared, **TINY))
    source = shutil.copytree(prepared / "train-lm" / "model", tmp_path / "source")
    other = tmp_path / "other"
    shutil.copytree(prepared / "prepare", other / "prepare")
    config = TrainLMConfig(run_dir=other, model=str(source), **TINY)
    first = train_lm(config)
    assert first.inputs["model"] == model_fingerprint(source) and train_lm(config).fingerprint == first.fingerprint
    tensors = load_file(source / "model.safetensors")
    name = next(k for k in tensors if k.endswith("ln_f.weight"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    second = train_lm(config)
    assert second.inputs["model"] == model_fingerprint(source) != first.inputs["model"]
    assert not torch.equal(weights(other)[name], load_file(prepared / "train-lm" / "model" / "model.safetensors")[name])
