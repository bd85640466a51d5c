"""The whole pipeline through `mlpmem run` on a tiny slice, and λ = 0 reproducing the base LM exactly."""

import json
import math

import yaml

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


def write_config(tmp_path, **changes):
    config = {"run_dir": str(tmp_path / "run"), **TINY_PIPELINE, **changes}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_whole_pipeline_then_rerun_reuses_every_stage(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    names = [s["name"] for s in results["systems"]]
    assert names == ["base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"]
    for system in results["systems"]:
        assert math.isfinite(system["valid_ppl"]) and math.isfinite(system["test_ppl"])
        assert system["valid_ppl"] <= results["systems"][0]["valid_ppl"] + 1e-9  # λ = 0 is on every grid
    assert (tmp_path / "run" / "evaluate" / "lambda.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "mlp-memory+knn-lm" in out and "targets" in out

    manifests = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/manifest.json")}
    assert main(["run", str(path)]) == 0  # a second run reuses every complete stage
    assert manifests == {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/manifest.json")}


def test_lambda_zero_reproduces_base_perplexity_exactly(tmp_path):
    path = write_config(tmp_path, evaluate={**TINY_PIPELINE["evaluate"], "lmbdas": [0.0]})
    assert main(["run", str(path)]) == 0
    systems = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())["systems"]
    base = systems[0]
    for system in systems[1:]:
        assert system["valid_ppl"] == base["valid_ppl"] and system["test_ppl"] == base["test_ppl"], system["name"]
