"""``mlpmem lm-eval``: lm-evaluation-harness on the exported model's base LM and on the LM + memory.

Two local tasks shipped in ``harness_tasks/`` (a multiple-choice task and a loglikelihood_rolling task over the
tiny word vocabulary, no download). Every loglikelihood lm-eval computes must equal mlpmem's own scorer on the
same tokens: the forward core's per-position log p_LM(gold), the memory's log p_mem(gold) from the same forward's
keys, mixed by ``mix_log_probs`` as ``mlpmem evaluate`` does. Compared in float32: the scorer and the joint model
feed the memory the same float32 keys (one numeric path), so base and memory share one tolerance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mlpmem.data as mlpmem_data
from mlpmem.cli import main
from mlpmem.config import LmEvalConfig
from mlpmem.evaluate.scoring import score_tokens
from mlpmem.inference.mixing import mix_log_probs
from mlpmem.memory.system import memory_log_prob

from gen_inputs import exported, generation_run_template  # noqa: F401

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

pytest.importorskip("lm_eval")

from mlpmem.evaluate.harness import lm_eval_side_by_side, load_exported  # noqa: E402

TASKS = Path(__file__).parent / "harness_tasks"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The shipped task YAMLs with their data folder filled in."""
    folder = tmp_path_factory.mktemp("tasks")
    for data in TASKS.glob("*.jsonl"):
        shutil.copy(data, folder / data.name)
    for template in TASKS.glob("*.yaml.in"):
        (folder / template.name.removesuffix(".in")).write_text(template.read_text().replace("DATA_DIR", str(folder)))
    return folder


@pytest.fixture(scope="module")
def side_by_side(exported, tasks_dir):
    config = LmEvalConfig(
        model=str(exported),
        tasks=["mlpmem_tiny_mc", "mlpmem_tiny_rolling"],
        include_path=tasks_dir,
        batch_size=2,
        device="cpu",
    )
    return lm_eval_side_by_side(config)


def own_loglikelihood(model, context: list[int], continuation: list[int], memory: bool) -> float:
    """Σ log p(continuation | context) by mlpmem's scorer: one window over context + continuation."""
    tokens = np.asarray(context + continuation, dtype=np.int64)
    layers = [model.memory_layer] if memory else []
    scored = score_tokens(model.lm, tokens, len(tokens), len(tokens), 1, layers)  # positions 0 .. n-2
    parts = [torch.from_numpy(scored.lm_log_prob).double()]
    if memory:
        mem = memory_log_prob(model.memory, scored.keys[model.memory_layer], scored.gold)
        parts = mix_log_probs([parts[0], torch.from_numpy(mem).double()], [1 - model.lmbda, model.lmbda])
        parts = [parts]
    return float(parts[0][-len(continuation) :].sum())


@pytest.mark.parametrize("system", ["base", "mlp-memory"])
def test_lm_eval_loglikelihoods_equal_mlpmems_own_scorer(side_by_side, exported, system):
    model = load_exported(exported)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    tol = 1e-4  # float32 on both sides, for the base LM and the memory alike
    samples = side_by_side.results[system]["samples"]
    checked = 0
    for sample in samples["mlpmem_tiny_mc"]:
        for (context, continuation), (ll, _greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            ours = own_loglikelihood(model, ids(context), ids(continuation), memory=system == "mlp-memory")
            assert float(ll) == pytest.approx(ours, abs=tol)
            checked += 1
    for sample in samples["mlpmem_tiny_rolling"]:
        text = sample["doc"]["text"]
        ours = own_loglikelihood(model, [tokenizer.eos_token_id], ids(text), memory=system == "mlp-memory")
        assert float(sample["filtered_resps"][0]) == pytest.approx(ours, abs=tol)
        checked += 1
    assert checked == 4 * 3 + 3


def test_the_two_systems_differ_and_the_table_has_every_metric(side_by_side):
    metrics = {(task, metric) for task, metric, _, _ in side_by_side.rows}
    assert ("mlpmem_tiny_mc", "acc") in metrics and ("mlpmem_tiny_rolling", "word_perplexity") in metrics
    rolling = {m: (b, w) for t, m, b, w in side_by_side.rows if t == "mlpmem_tiny_rolling"}
    assert rolling["word_perplexity"][0] != rolling["word_perplexity"][1]


def test_cli_prints_both_systems_and_refuses_unknown_tasks(exported, tasks_dir, tmp_path, capsys):
    out_path = tmp_path / "lm-eval.json"
    argv = ["lm-eval", "--model", str(exported), "--include-path", str(tasks_dir), "--device", "cpu"]
    assert main([*argv, "--tasks", "mlpmem_tiny_mc", "--limit", "2", "--out-path", str(out_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "base", "+", "memory", "diff"]
    assert lines[1].split()[:2] == ["mlpmem_tiny_mc", "acc"] and out_path.is_file()
    assert main([*argv, "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks" in err and "no_such_task" in err


def test_the_shipped_wikitext2_slice_task_runs_from_any_folder(exported, tmp_path, monkeypatch):
    """``wikitext2_slice`` ships in the package: found without --include-path outside the repository, it scores the
    same document as lm-eval's own text loader reading the bundled file by its absolute path."""
    import yaml

    from mlpmem.evaluate.harness import SHIPPED_TASKS

    bundled = Path(mlpmem_data.__file__).parent / "bundled" / "wikitext-2" / "test.txt"
    reference = tmp_path / "reference"
    reference.mkdir()
    task = yaml.safe_load((SHIPPED_TASKS / "wikitext2_slice.yaml").read_text().replace("!function ", ""))
    del task["custom_dataset"]
    task.update(
        task="reference_slice",
        dataset_path="text",
        dataset_kwargs={"data_files": {"test": str(bundled)}, "sample_by": "document"},
    )
    (reference / "reference_slice.yaml").write_text(yaml.safe_dump(task))
    monkeypatch.chdir(tmp_path)  # outside the repository
    out = lm_eval_side_by_side(
        LmEvalConfig(
            model=str(exported),
            tasks=["wikitext2_slice", "reference_slice"],
            include_path=reference,
            limit=1,
            batch_size=8,
            device="cpu",
        )
    )
    rows = {(t, m): (b, w) for t, m, b, w in out.rows}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert rows[("wikitext2_slice", metric)] == rows[("reference_slice", metric)]
        assert np.isfinite(rows[("wikitext2_slice", metric)]).all()


def one_line_exit_2(capsys, argv: list[str]) -> str:
    """The error line of a command that must end in one line and exit 2 (lm-eval's own log lines may precede it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n") and err.splitlines()[-1].startswith("mlpmem: error: ")
    return err.splitlines()[-1]


@pytest.mark.parametrize("damage", ["truncated weights", "no tokenizer"])
def test_a_damaged_export_is_one_line_and_exit_2(exported, tasks_dir, tmp_path, capsys, damage):
    folder = Path(shutil.copytree(exported, tmp_path / "model"))
    if damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    argv = ["lm-eval", "--model", str(folder), "--include-path", str(tasks_dir), "--tasks", "mlpmem_tiny_mc"]
    err = one_line_exit_2(capsys, [*argv, "--device", "cpu", "--limit", "1"])
    assert str(folder) in err and ("cannot load" in err if damage == "truncated weights" else "no tokenizer" in err)


def test_a_model_whose_outputs_are_nan_does_not_exit_0(exported, tasks_dir, tmp_path, capsys):
    """Finite weights (recorded as exported) whose memory logits overflow: every mixed log-prob is nan. The
    multiple-choice accuracy over them is still a number, so the per-sample log-likelihoods are what is checked."""
    model = load_exported(exported)
    with torch.no_grad():
        model.memory.norm.bias.fill_(3e38)  # finite; times head weights of both signs, the logits are inf - inf
    assert torch.isnan(model(torch.tensor([[5, 6, 7]])).logits).all()
    folder = tmp_path / "model"
    model.save_pretrained(folder)  # records the sha256 of these weights: loading accepts them
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(exported / name, folder / name)
    argv = ["lm-eval", "--model", str(folder), "--include-path", str(tasks_dir), "--tasks", "mlpmem_tiny_mc"]
    err = one_line_exit_2(capsys, [*argv, "--device", "cpu", "--limit", "2"])
    assert "nan" in err and "mlpmem_tiny_mc" in err and "mlp-memory" in err


def test_the_include_path_help_says_it_is_trusted_like_code(capsys):
    with pytest.raises(SystemExit):
        main(["lm-eval", "--help"])
    assert "trusted like code" in " ".join(capsys.readouterr().out.split())
