"""The whole pipeline through `mlpmem run` on a tiny slice, and λ = 0 reproducing the base LM exactly."""

import json
import math
import shutil

import pytest
import yaml
from conftest import tiny_gpt2

from mlpmem.cli import main

TINY_PIPELINE = {
    "stages": ["prepare", "train-lm", "datastore", "index", "targets", "train-memory", "evaluate"],
    "prepare": {"corpus": "wikitext-2-slice", "train_tokenizer": 1000},
    "train_lm": {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 64, "max_steps": 20, "eval_interval": 10,
                 "batch_size": 8, "dtype": "float32", "device": "cpu"},
    "datastore": {"device": "cpu", "batch_size": 16},
    "index": {"factory": "IVF128,Flat", "nprobe": 4},
    "targets": {"k": 8, "width": 8, "knn_temperature": 5.0},
    "train_memory": {"n_blocks": 1, "epochs": 0.3, "batch_size": 256, "valid_size": 512, "eval_interval": 50,
                     "dtype": "float32", "device": "cpu"},
    "evaluate": {"k": 16, "max_tokens": 1500, "knn_temperatures": [5.0], "lmbdas": [0.0, 0.25, 0.5], "device": "cpu"},
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


def test_whole_pipeline_then_rerun_reuses_every_stage(pipeline, capsys):
    path, run = pipeline
    results = json.loads((run / "evaluate" / "results.json").read_text())
    names = [s["name"] for s in results["systems"]]
    assert names == ["base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"]
    for system in results["systems"]:
        assert math.isfinite(system["valid_ppl"]) and math.isfinite(system["test_ppl"])
        assert system["valid_ppl"] <= results["systems"][0]["valid_ppl"] + 1e-9  # λ = 0 is on every grid
    assert (run / "evaluate" / "lambda.png").stat().st_size > 0

    manifests = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    assert main(["run", str(path)]) == 0  # a second run reuses every complete stage
    assert manifests == {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/manifest.json")}
    out = capsys.readouterr().out
    assert "mlp-memory+knn-lm" in out and "targets" in out


def test_lambda_zero_reproduces_base_perplexity_exactly(pipeline, tmp_path):
    _, run = pipeline
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("evaluate"))
    path = write_config(tmp_path, tmp_path / "run", evaluate={**TINY_PIPELINE["evaluate"], "lmbdas": [0.0]})
    assert main(["run", str(path), "--stages", "evaluate"]) == 0
    systems = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())["systems"]
    base = systems[0]
    for system in systems[1:]:
        assert system["valid_ppl"] == base["valid_ppl"] and system["test_ppl"] == base["test_ppl"], system["name"]


@pytest.mark.parametrize("knn,message", [("true", "datastore was built with another model"),
                                         ("false", "memory was trained on keys of base model")])
def test_artifacts_of_another_model_are_refused(pipeline, tmp_path, capsys, knn, message):
    _, run = pipeline
    other = tmp_path / "other-lm"
    tiny_gpt2(vocab_size=1000, seed=1).save_pretrained(other)
    shutil.copytree(run / "prepare" / "tokenizer", other, dirs_exist_ok=True)
    capsys.readouterr()  # drop the fixture's own progress output
    code = main(["evaluate", "--run-dir", str(run), "--model", str(other), "--knn", knn, "--max-tokens", "200"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
