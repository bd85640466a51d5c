"""End to end through the CLI: prepare → train-lm → evaluate on the bundled slice."""

import json
import math

from mlpmem.artifacts import RunDir
from mlpmem.cli import main


def test_prepare_train_evaluate_on_bundled_slice(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["prepare", "--corpus", "wikitext-2-slice", "--train-tokenizer", "300", "--run-dir", run]) == 0
    assert (
        main(
            [
                "train-lm",
                "--run-dir",
                run,
                "--n-layer",
                "1",
                "--n-embd",
                "32",
                "--n-head",
                "2",
                "--context",
                "64",
                "--max-steps",
                "20",
                "--eval-interval",
                "10",
                "--batch-size",
                "8",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    lm = RunDir(run).require("train-lm")
    assert lm.steps == 20 and [h["step"] for h in lm.history] == [10, 20] and lm.config.n_layer == 1
    assert (tmp_path / "run" / "train-lm" / "model" / "model.safetensors").is_file()
    assert main(["evaluate", "--run-dir", run, "--max-tokens", "3000", "--context", "64", "--stride", "32"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    base = results["systems"][0]
    assert "base" in out and f"{base['test_ppl']:.2f}" in out
    assert results["tokens"] == {"valid": 2999, "test": 2999}
    assert 1 < base["valid_ppl"] < 300 and math.isfinite(base["test_ppl"])  # better than uniform over 300 tokens
