"""The CLI contract: help lists every command, configs validate, user mistakes are one line + exit 2."""

from pathlib import Path

import pytest
import yaml

from mlpmem.cli import STAGE_FUNCTIONS, build_parser, main
from mlpmem.config import STAGES, RunConfig, load_yaml, to_yaml, validate

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for name in ["run", *STAGES]:
        assert name in out


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_lists_every_field(stage, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([stage, "--help"])
    out = capsys.readouterr().out
    for name in STAGES[stage].model_fields:
        assert f"--{name.replace('_', '-')}" in out
    assert stage in STAGE_FUNCTIONS


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    run = validate(RunConfig, load_yaml(path))
    for stage in run.stages:
        run.stage_config(stage)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_config_yaml_round_trips(stage):
    data = {"tokenizer": "gpt2"} if stage == "prepare" else {}
    config = validate(STAGES[stage], data)
    assert validate(STAGES[stage], yaml.safe_load(to_yaml(config))) == config


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-lm", "--max-stepz", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--max-stepz" in err


def test_bad_values_are_all_named_on_one_line(capsys):
    code, _, err = run_cli(capsys, "train-lm", "--max-steps", "-3", "--lr", "abc")
    assert code == 2 and err.count("\n") == 1
    assert "--max-steps" in err and "--lr" in err and "Traceback" not in err


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("run_dir: x\nstages: [prepare]\nprepare:\n  tokenzier: gpt2\n")
    code, _, err = run_cli(capsys, "run", str(tmp_path / "p.yaml"))
    assert code == 2 and "--prepare.tokenzier: unknown key" in err and err.count("\n") == 1


def test_missing_corpus_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "prepare", "--corpus", str(tmp_path / "none.txt"), "--train-tokenizer", "300",
                           "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "corpus not found" in err and err.count("\n") == 1


def test_stage_before_its_inputs_says_what_to_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-lm", "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "run `mlpmem prepare" in err


def test_run_overrides_reach_the_stage_config(tmp_path):
    from mlpmem.cli import apply_overrides

    data = apply_overrides(load_yaml(ROOT / "configs" / "demo.yaml"), ["--train-lm.max-steps", "7", "--stages", "prepare"])
    run = validate(RunConfig, data)
    assert run.stage_config("train-lm").max_steps == 7 and run.stages == ["prepare"]
