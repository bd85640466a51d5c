"""The whole pipeline through `mlpmem run` on a tiny slice: reuse, an independent check of the published numbers,
and the fault campaign's end-to-end cases (refused commands keep finished stages, damaged weights are refused)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.data.windows import sliding_windows
from mlpmem.memory.model import MLPMemory

from conftest import tiny_gpt2

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

TINY_PIPELINE = {
    "stages": ["prepare", "train-lm", "datastore", "index", "targets", "train-memory", "evaluate"],
    "prepare": {"corpus": "wikitext-2-slice", "train_tokenizer": 1000},
    "train_lm": {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "context": 64,
        "max_steps": 20,
        "eval_interval": 10,
        "batch_size": 8,
        "dtype": "float32",
        "device": "cpu",
    },
    "datastore": {"device": "cpu", "batch_size": 16},
    "index": {"factory": "IVF128,Flat", "nprobe": 4},
    "targets": {"k": 8, "width": 8, "knn_temperature": 5.0},
    "train_memory": {
        "n_blocks": 1,
        "epochs": 0.3,
        "batch_size": 256,
        "valid_size": 512,
        "eval_interval": 50,
        "dtype": "float32",
        "device": "cpu",
    },
    "evaluate": {"k": 16, "max_tokens": 1500, "knn_temperatures": [5.0], "lmbdas": [0.1, 0.25, 0.5], "device": "cpu"},
}


def write_config(folder, run_dir, **changes):
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), **TINY_PIPELINE, **changes}))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One whole pipeline run shared by this module's tests: (config path, run dir)."""
    folder = tmp_path_factory.mktemp("pipeline")
    path = write_config(folder, folder / "run")
    assert main(["run", str(path)]) == 0
    return path, folder / "run"


@pytest.fixture
def run_copy(pipeline, tmp_path):
    """A private copy of the pipeline's run directory (for tests that damage or change it)."""
    _, run = pipeline
    return shutil.copytree(run, tmp_path / "run")


def test_whole_pipeline_then_rerun_reuses_every_stage(pipeline, capsys):
    path, run = pipeline
    manifest = RunDir(run).require("evaluate")
    assert [s.name for s in manifest.systems] == ["base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"]
    for system in manifest.systems:
        assert math.isfinite(system.valid_ppl) and math.isfinite(system.test_ppl)
    assert (run / "evaluate" / "lambda.png").stat().st_size > 0
    capsys.readouterr()

    manifests = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    assert main(["run", str(path)]) == 0  # a second run reuses every complete stage
    assert manifests == {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    out, err = capsys.readouterr()
    assert "mlp-memory+knn-lm" in out
    for stage in TINY_PIPELINE["stages"]:
        assert f"{stage}: reused" in err


def test_memory_perplexity_equals_an_independent_recomputation(pipeline):
    """The published mlp-memory row, recomputed without mlpmem's scoring, hooks or mixing: one plain forward per
    window, the key taken by a hook written here, the mixture formed in probability space."""
    _, run = pipeline
    evaluate = RunDir(run).require("evaluate")
    row = evaluate.system("mlp-memory")
    lm = AutoModelForCausalLM.from_pretrained(run / "train-lm" / "model").eval()
    memory = MLPMemory.from_pretrained(run / "train-memory" / "model").eval()
    tokens = np.fromfile(run / "prepare" / "test.bin", dtype=np.uint16)[
        : TINY_PIPELINE["evaluate"]["max_tokens"]
    ].astype(np.int64)
    captured = {}
    lm.get_submodule(memory.config.key_layer).register_forward_hook(lambda m, i, o: captured.__setitem__("key", o))
    nll = []
    with torch.no_grad():
        for w in sliding_windows(len(tokens), evaluate.context, evaluate.stride):
            x = torch.from_numpy(tokens[w.begin : w.end])[None]
            p_lm = torch.softmax(lm(x).logits[0].double(), -1)  # [L, V]
            p_mem = torch.softmax(memory(captured["key"][0]).double(), -1)
            for pos in range(w.first_scored, w.end - 1):
                i, gold = pos - w.begin, tokens[pos + 1]
                nll.append(-math.log((1 - row.lmbda) * p_lm[i, gold] + row.lmbda * p_mem[i, gold]))
    assert len(nll) == evaluate.tokens["test"]
    assert math.exp(np.mean(nll)) == pytest.approx(row.test_ppl, rel=1e-4)
    assert row.test_ppl < evaluate.system("base").test_ppl  # the memory helps even on this tiny run


def test_a_refused_evaluate_keeps_the_finished_results(run_copy, capsys):
    before = (run_copy / "evaluate" / "results.json").read_bytes()
    assert main(["evaluate", "--run-dir", str(run_copy), "--context", "512", "--device", "cpu"]) == 2
    assert "512" in capsys.readouterr().err
    assert (run_copy / "evaluate" / "results.json").read_bytes() == before
    assert RunDir(run_copy).require("evaluate").system("mlp-memory").lmbda is not None


def test_a_refused_index_keeps_the_finished_index(run_copy, capsys):
    before = RunDir(run_copy).require("index").fingerprint
    assert main(["index", "--run-dir", str(run_copy), "--factory", "IVF100000,Flat"]) == 2
    err = capsys.readouterr().err
    assert "lists but only" in err and err.count("\n") == 1
    assert RunDir(run_copy).require("index").fingerprint == before


def test_damaged_lm_weights_are_refused_instead_of_reusing_stale_results(run_copy, tmp_path, capsys):
    weights = run_copy / "train-lm" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-300:-44] = bytes(b ^ 0x5A for b in data[-300:-44])  # 256 flipped bytes inside the tensors
    weights.write_bytes(bytes(data))
    path = write_config(tmp_path, run_copy)
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines of the stages run before it
    assert last.startswith("mlpmem: error:") and "model.safetensors does not match its recorded content hash" in last
    assert "Traceback" not in err
    assert main(["verify", str(run_copy)]) == 1


def test_verify_passes_on_the_pipeline_run(pipeline, capsys):
    _, run = pipeline
    assert main(["verify", str(run)]) == 0
    assert "all stages verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    "knn,message", [("true", "built with another model"), ("false", "memory was trained on keys of base model")]
)
def test_artifacts_of_another_model_are_refused(pipeline, tmp_path, capsys, knn, message):
    _, run = pipeline
    other = tmp_path / "other-lm"
    tiny_gpt2(vocab_size=1000, seed=1).save_pretrained(other)
    shutil.copytree(run / "prepare" / "tokenizer", other, dirs_exist_ok=True)
    capsys.readouterr()  # drop the fixture's own progress output
    code = main(["evaluate", "--run-dir", str(run), "--model", str(other), "--knn", knn, "--max-tokens", "200"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert json.loads((run / "evaluate" / "manifest.json").read_text())["status"] == "complete"


def test_actions_default_to_the_most_recent_run(pipeline, tmp_path, monkeypatch, capsys):
    from mlpmem.cli import default_run_dir
    from mlpmem.config import GenerateConfig

    _, run = pipeline
    (tmp_path / "runs").mkdir()
    shutil.copytree(run, tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    config = default_run_dir(GenerateConfig(prompt="x"), "generate")
    assert str(config.run_dir) == "runs/demo" and "using runs/demo" in capsys.readouterr().err
