"""The joint model as a native HF causal LM, exported and loaded back through the Auto classes.

References are independent of ``mlpmem.inference``: a plain forward hook on the memory's key module, the memory's
and the LM's softmax mixed in probability space, the NLL and argmax computed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, Trainer, TrainingArguments, pipeline

import mlpmem
from mlpmem.cli import main
from mlpmem.errors import UsageError
from mlpmem.inference.generation import MemoryAugmentedLM
from mlpmem.inference.joint import MemoryAugmentedForCausalLM

from conftest import tiny_gpt2
from gen_inputs import MEMORY_LAYER, exported, generation_run, generation_run_template  # noqa: F401

PROMPT = torch.tensor([[5, 6, 7, 8, 40, 41]])
ROWS = torch.tensor([[5, 6, 7, 8, 40, 41, 3, 9], [11, 12, 13, 2, 2, 70, 71, 72]])


def load(folder: Path) -> MemoryAugmentedForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def brute_force(model: MemoryAugmentedForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Joint probabilities [B, T, V]: (1 − λ)·softmax(LM logits) + λ·softmax(memory(keys)), keys from a plain hook."""
    captured = {}
    handle = model.lm.get_submodule(MEMORY_LAYER).register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        logits = model.lm(ids, use_cache=False).logits.double()
        memory = model.memory(captured["k"]).double()
    handle.remove()
    lmbda = model.config.lmbda
    return (1 - lmbda) * torch.softmax(logits, -1) + lmbda * torch.softmax(memory, -1)


def test_logits_and_loss_are_the_probability_space_mixture(exported):
    model = load(exported)
    assert isinstance(model, MemoryAugmentedForCausalLM) and model.lmbda == 0.4
    with torch.no_grad():
        out = model(ROWS, labels=ROWS)
    p = brute_force(model, ROWS)
    torch.testing.assert_close(out.logits.double().exp(), p, rtol=1e-5, atol=1e-7)
    nll = -p[:, :-1].gather(-1, ROWS[:, 1:, None]).log().mean()
    torch.testing.assert_close(out.loss.double(), nll, rtol=1e-5, atol=1e-6)


def test_greedy_generate_is_the_argmax_of_the_full_forward(exported):
    model = load(exported)
    out = model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    clear = 0
    for t in range(PROMPT.shape[1], out.shape[0]):
        ref = brute_force(model, out[None, :t])[0, -1].log()
        top2 = torch.topk(ref, 2).values
        if top2[0] - top2[1] > 1e-4:
            assert int(out[t]) == int(ref.argmax()), f"step {t - PROMPT.shape[1]}"
            clear += 1
    assert clear >= 10
    base = model.lm.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    assert not torch.equal(out, base), "the memory should change some choices of this tiny LM"


@pytest.mark.parametrize(
    "kwargs", [{"do_sample": True, "top_k": 20, "temperature": 0.8}, {"num_beams": 3, "num_return_sequences": 2}]
)
def test_sampling_and_beams_with_the_kv_cache_equal_without(exported, kwargs):
    model = load(exported)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(PROMPT, max_new_tokens=8, pad_token_id=0, use_cache=use_cache, **kwargs))
    assert torch.equal(*runs)


def test_round_trip_equals_the_model_built_from_the_run(generation_run_template, exported):
    mlm = MemoryAugmentedLM.from_run(generation_run_template, lmbda=0.4, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(load(exported)(ROWS).logits, mlm.joint_log_probs(ROWS), rtol=0, atol=0)
    memory = AutoModel.from_pretrained(generation_run_template / "train-memory" / "model")
    assert isinstance(memory, mlpmem.MLPMemory)
    card = (exported / "README.md").read_text()
    assert "license: other" in card and "λ (memory weight) | 0.4: set with --lmbda" in card
    assert f"--run-dir {generation_run_template}" in card and "corpus fingerprint" in card


def test_pipeline_and_trainer_evaluate_use_the_mixture(exported, tmp_path):
    model = load(exported)
    generator = pipeline("text-generation", model=str(exported))
    text = generator("w5 w6 w7 w8 w40 w41", max_new_tokens=6, do_sample=False, return_full_text=False)
    ids = model.generate(PROMPT, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, PROMPT.shape[1] :]
    assert text[0]["generated_text"].split() == generator.tokenizer.decode(ids).split()
    data = [{"input_ids": row, "labels": row} for row in ROWS]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    metrics = Trainer(model=model, args=args, eval_dataset=data).evaluate()
    p = brute_force(model, ROWS)
    nll = -p[:, :-1].gather(-1, ROWS[:, 1:, None]).log().mean()
    assert metrics["eval_loss"] == pytest.approx(float(nll), rel=1e-5)


def test_import_mlpmem_is_light_and_registers_the_auto_classes(exported):
    code = (
        "import sys, mlpmem; assert 'torch' not in sys.modules and 'transformers' not in sys.modules;"
        "from transformers import AutoModelForCausalLM;"
        f"print(type(AutoModelForCausalLM.from_pretrained({str(exported)!r})).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MemoryAugmentedForCausalLM"


# bad input --------------------------------------------------------------------------------------------------------
def one_line_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_exporting_an_incomplete_run_is_one_line(generation_run, tmp_path, capsys):
    (generation_run / "train-memory" / "manifest.json").unlink()
    err = one_line_error(capsys, "export", "--run-dir", str(generation_run), "--out", str(tmp_path / "x"))
    assert "train-memory" in err and not (tmp_path / "x").exists()


def test_lambda_outside_0_1_is_one_line(generation_run, tmp_path, capsys):
    out = str(tmp_path / "x")
    err = one_line_error(capsys, "export", "--run-dir", str(generation_run), "--out", out, "--lmbda", "1.5")
    assert "--lmbda" in err
    with pytest.raises(UsageError, match="λ"):
        MemoryAugmentedLM.from_run(generation_run, lmbda=-0.1, device="cpu")


def test_a_destination_that_is_not_an_export_is_refused(generation_run, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    err = one_line_error(capsys, "export", "--run-dir", str(generation_run), "--out", str(tmp_path / "mine"))
    assert "not an mlpmem export" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(exported, tmp_path / "model"))


def test_a_folder_without_the_base_lm_weights_is_refused(export_copy):
    weights = load_file(export_copy / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm.")}, export_copy / "model.safetensors")
    with pytest.raises(UsageError, match="base LM's weights are missing"):
        load(export_copy)


def test_a_folder_holding_another_models_lm_is_refused(export_copy):
    weights = load_file(export_copy / "model.safetensors")
    other = {f"lm.{k}": v for k, v in tiny_gpt2(seed=1).state_dict().items() if f"lm.{k}" in weights}
    save_file({**weights, **other}, export_copy / "model.safetensors")
    with pytest.raises(UsageError, match="not the ones exported"):
        load(export_copy)


def test_a_config_with_lambda_outside_0_1_is_refused(export_copy):
    config = json.loads((export_copy / "config.json").read_text())
    config["lmbda"] = 1.5
    (export_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="λ"):
        load(export_copy)
