"""The joint model as a native HF causal LM, exported and loaded back through the Auto classes.

References are independent of ``mlpmem.inference``: a plain forward hook on the memory's key module, the memory's
and the LM's softmax mixed in probability space, the NLL and argmax computed here; for ``export --knn``, p_kNN from
an exact numpy search over the run's stored datastore keys.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, Trainer, TrainingArguments, pipeline

import mlpmem
from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.errors import UsageError
from mlpmem.inference.generation import MemoryAugmentedLM
from mlpmem.inference.joint import MemoryAugmentedForCausalLM

from conftest import tiny_gpt2
from gen_inputs import KNN_LAYER, MEMORY_LAYER, exported, generation_run, generation_run_template  # noqa: F401

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

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
    return Path(shutil.copytree(exported, tmp_path / "model"))


def test_a_full_disk_during_export_is_one_line_and_leaves_the_earlier_export(
    generation_run, export_copy, monkeypatch, capsys
):
    """The disk fills while the weights are written: one line, no half export left in out.partial, the earlier
    export in place."""
    before = {p.name: p.read_bytes() for p in export_copy.iterdir()}

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MemoryAugmentedForCausalLM, "save_pretrained", full_disk)
    err = one_line_error(capsys, "export", "--run-dir", str(generation_run), "--out", str(export_copy))
    assert err.startswith("mlpmem: error: no space left writing") and "free space" in err
    assert not export_copy.with_name("model.partial").exists()
    assert {p.name: p.read_bytes() for p in export_copy.iterdir()} == before


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


def edit_memory_weights(folder: Path, change) -> None:
    """Rewrite the folder's memory head with ``change`` applied (the config, and its sha256, left as exported)."""
    weights = load_file(folder / "model.safetensors")
    change(weights["memory.head.weight"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.view(-1)[7].fill_(float("nan")), "memory.head.weight holds nan/inf"),
        (lambda w: w.view(-1)[7].fill_(float("inf")), "memory.head.weight holds nan/inf"),
        (lambda w: w.neg_(), "the memory's weights are not the ones exported"),  # finite, but not what was exported
    ],
)
def test_damaged_memory_weights_are_refused(export_copy, change, message):
    edit_memory_weights(export_copy, change)
    with pytest.raises(UsageError, match=message) as err:
        load(export_copy)
    assert "\n" not in str(err.value)


def test_the_export_records_the_memory_weights_sha256(exported):
    """The recorded value is the sha256 of the memory's tensors, recomputed here with hashlib over the file's."""
    import hashlib

    weights = load_file(exported / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(k for k in weights if k.startswith("memory.")):
        t = weights[name].contiguous()
        digest.update(f"{name.removeprefix('memory.')}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    assert json.loads((exported / "config.json").read_text())["memory_weights_sha256"] == digest.hexdigest()


@pytest.mark.parametrize(
    "memory_layer, key_layer, message",
    [
        ("transformer.h.1.ln_2", MEMORY_LAYER, "not the LM module the memory was trained on"),  # the other block
        (None, MEMORY_LAYER, "not the LM module the memory was trained on"),
        ("transformer.h.9.ln_2", "transformer.h.9.ln_2", "has no module 'transformer.h.9.ln_2'"),
        ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_fc", "gives keys of width 128, the memory reads 32"),
    ],
)
def test_an_edited_memory_layer_is_refused(export_copy, memory_layer, key_layer, message):
    config = json.loads((export_copy / "config.json").read_text())
    config["memory_layer"], config["memory_config"]["key_layer"] = memory_layer, key_layer
    (export_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=message) as err:
        load(export_copy)
    assert "\n" not in str(err.value)


def test_a_truncated_weights_file_is_refused(export_copy):
    data = (export_copy / "model.safetensors").read_bytes()
    (export_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="cannot load .*only safetensors weights are read") as err:
        load(export_copy)
    assert "\n" not in str(err.value)


def test_pickled_weights_are_never_unpickled(export_copy, tmp_path):
    """A pytorch_model.bin whose unpickling would run code: refused by name, the code never runs."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (export_copy / "model.safetensors").unlink()
    (export_copy / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UsageError, match=r"pickled weights \(pytorch_model.bin\)"):
        load(export_copy)
    with pytest.raises(UsageError):  # asked for explicitly, still not read
        AutoModelForCausalLM.from_pretrained(export_copy, use_safetensors=False)
    assert not marker.exists()


# mlpmem export --knn: the folder also mixes in kNN-LM from the run's datastore and index -------------------------
def export_knn(run: Path, out: Path) -> Path:
    """``mlpmem export --knn`` of ``run`` (memory λ = 0.4, k = 48; kNN-LM λ and T left to their defaults)."""
    argv = ["export", "--run-dir", str(run), "--out", str(out), "--lmbda", "0.4", "--knn", "--k", "48"]
    assert main(argv) == 0
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = None  # every generation runs its full length
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def exported_knn(generation_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_knn(generation_run_template, tmp_path_factory.mktemp("export-knn") / "model")


def brute_force_knn(folder: Path, model: MemoryAugmentedForCausalLM, ids: torch.Tensor) -> np.ndarray:
    """Joint probabilities [B, T, V] float64: (1 − λ − λ_kNN)·p_LM + λ·p_mem + λ_kNN·p_kNN with the λs, k and T
    read from the folder's config.json; p_kNN by exact search (numpy) over the run's stored datastore keys."""
    config = json.loads((folder / "config.json").read_text())
    knn = config["knn"]
    lmbda, knn_lmbda, k, temperature = config["lmbda"], knn["knn_lmbda"], knn["k"], knn["knn_temperature"]
    captured = {}
    hooks = [
        model.lm.get_submodule(layer).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        for name, layer in (("mem", MEMORY_LAYER), ("knn", KNN_LAYER))
    ]
    with torch.no_grad():
        p_lm = torch.softmax(model.lm(ids, use_cache=False).logits.double(), -1).numpy()
        p_mem = torch.softmax(model.memory(captured["mem"]).double(), -1).numpy()
    for hook in hooks:
        hook.remove()
    run = RunDir(knn["run_dir"])
    keys = np.asarray(run.array("datastore", "keys"), dtype=np.float64)  # [N, d]
    values = np.asarray(run.array("datastore", "values"), dtype=np.int64)  # [N]
    queries = captured["knn"].double().numpy().reshape(-1, keys.shape[1])  # [B*T, d]
    dists = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # [B*T, N] squared L2
    order = np.argsort(dists, axis=1, kind="stable")
    ranked = np.take_along_axis(dists, order, axis=1)
    # the k nearest must be unambiguous: no (near-)tie at the k-th distance between entries of different values
    # (the datastore holds equal keys: every window's first position sees one token)
    band = np.abs(ranked - ranked[:, k - 1 : k]) <= 1e-3  # [B*T, N], contiguous around rank k - 1
    straddles = band[:, :k].any(1) & band[:, k:].any(1)
    for row in np.flatnonzero(straddles):
        assert len(np.unique(values[order[row][band[row]]])) == 1, "a tie at the k-th neighbour: choose another k"
    near, d = order[:, :k], ranked[:, :k]
    w = np.exp(-(d - d[:, :1]) / temperature)
    w /= w.sum(1, keepdims=True)
    p_knn = np.zeros((len(queries), p_lm.shape[-1]))
    np.add.at(p_knn, (np.arange(len(queries))[:, None], values[near]), w)
    p_knn = p_knn.reshape(p_lm.shape)
    return (1 - lmbda - knn_lmbda) * p_lm + lmbda * p_mem + knn_lmbda * p_knn


def test_knn_export_logits_are_the_probability_space_mixture(exported_knn, generation_run_template):
    model = load(exported_knn)
    config = json.loads((exported_knn / "config.json").read_text())
    assert config["knn"]["run_dir"] == str(generation_run_template.resolve())
    assert (config["lmbda"], config["knn"]["knn_lmbda"], config["knn"]["k"]) == (0.4, 0.25, 48)
    assert config["knn"]["knn_temperature"] == 5.0  # no evaluate stage: the memory's T
    assert (model.lmbda, model.knn_lmbda) == (0.4, 0.25) and model.knn is not None
    with torch.no_grad():
        out = model(ROWS, labels=ROWS)
    p = brute_force_knn(exported_knn, model, ROWS)
    np.testing.assert_allclose(out.logits.double().exp().numpy(), p, rtol=1e-5, atol=1e-7)
    nll = -np.log(np.take_along_axis(p[:, :-1], ROWS[:, 1:, None].numpy(), -1)).mean()
    assert float(out.loss) == pytest.approx(nll, rel=1e-5)
    memory_only = brute_force(model, ROWS).numpy()  # (1 − λ)·p_LM + λ·p_mem
    assert np.abs(p - memory_only).max() > 0.05, "kNN-LM should visibly change this tiny model's distribution"


def test_knn_export_greedy_generate_is_the_argmax_of_the_full_forward(exported_knn, exported):
    model = load(exported_knn)
    out = model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    clear = 0
    for t in range(PROMPT.shape[1], out.shape[0]):
        ref = np.log(brute_force_knn(exported_knn, model, out[None, :t])[0, -1])
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 1e-4:
            assert int(out[t]) == int(ref.argmax()), f"step {t - PROMPT.shape[1]}"
            clear += 1
    assert clear >= 10
    memory_only = load(exported).generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    assert not torch.equal(out, memory_only), "kNN-LM should change some choices of this tiny model"


@pytest.mark.parametrize(
    "gone", ["index", "index/index.faiss", "datastore", "datastore/values.bin", "datastore/keys.bin"]
)
def test_knn_export_whose_run_lost_its_index_or_datastore_is_refused(generation_run, tmp_path, gone):
    folder = export_knn(generation_run, tmp_path / "model")
    path = generation_run / gone
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(UsageError) as err:
        load(folder)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_memory_dtype_is_stored_in_the_export_and_loads_back(generation_run_template, tmp_path, dtype):
    """--memory-dtype: the folder holds the low-precision weights (int8 codes + scales, or bf16) and loads back to
    exactly the joint model built from the run at that dtype; the LM is untouched."""
    from mlpmem.memory.quantize import quantize_memory

    out = tmp_path / dtype
    argv = ["export", "--run-dir", str(generation_run_template), "--out", str(out), "--lmbda", "0.4"]
    assert main([*argv, "--memory-dtype", dtype]) == 0
    weights = load_file(out / "model.safetensors")
    head = {"int8": torch.int8, "bf16": torch.bfloat16}[dtype]
    assert weights["memory.head.weight"].dtype == head and weights["lm.transformer.wte.weight"].dtype == torch.float32
    assert ("memory.head.scale" in weights) == (dtype == "int8")
    model = load(out)
    mlm = MemoryAugmentedLM.from_run(generation_run_template, lmbda=0.4, device="cpu", memory_dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(ROWS).logits, mlm.joint_log_probs(ROWS), rtol=0, atol=0)
        # the stored memory is the float32 one quantised here, tensor for tensor
        reference = quantize_memory(MemoryAugmentedLM.from_run(generation_run_template, device="cpu").memory, dtype)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(model.memory.state_dict()[name], tensor), name
