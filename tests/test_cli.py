"""The CLI contract: help lists every command, configs validate, user mistakes are one line + exit 2."""

import os
from pathlib import Path

import faiss
import pytest
import torch
import yaml

import mlpmem
from mlpmem.artifacts import RunDir
from mlpmem.cli import build_parser, main
from mlpmem.config import load_yaml, to_yaml, validate
from mlpmem.devices import set_threads
from mlpmem.errors import UsageError
from mlpmem.presets import load_pipeline, preset_names, preset_path, resolve_pipeline
from mlpmem.stages import STAGES, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_stage_with_its_help_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    text = "\n".join(lines)
    for spec in STAGES:  # each command on its own line, followed by the table's help line
        assert any(line.startswith(spec.name) for line in lines), spec.name
        assert " ".join(spec.help.split()[:3]) in text, spec.name
    assert any(line.startswith("run ") for line in lines) and any(line.startswith("verify ") for line in lines)


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_help_lists_every_field_with_its_type(spec, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([spec.name, "--help"])
    out = capsys.readouterr().out
    for name in spec.config.model_fields:
        assert f"--{name.replace('_', '-')}" in out
    assert "VALUE" not in out  # every flag shows its type or choices
    assert callable(spec.function())


@pytest.mark.parametrize("name", preset_names())
def test_shipped_presets_validate(name):
    run = validate(RunConfig, load_pipeline(name))
    for stage in run.stages:
        run.stage_config(stage)


def test_presets_ship_in_the_package_and_resolve_by_name_or_file(tmp_path, monkeypatch, capsys):
    assert {"demo", "wt2"} <= set(preset_names())
    assert preset_path("demo").parent == Path(mlpmem.__file__).parent / "presets"
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert resolve_pipeline("demo") == resolve_pipeline("demo.yaml") == preset_path("demo")
    (tmp_path / "demo").mkdir()  # an existing path wins over a preset of the same name
    assert resolve_pipeline("demo") == Path("demo")
    (tmp_path / "mine.yaml").write_text("run_dir: r\n")
    assert resolve_pipeline("mine.yaml") == Path("mine.yaml")
    code, _, err = run_cli(capsys, "run", "nosuch", "--stages", "prepare")
    assert code == 2 and "no pipeline file or preset named 'nosuch' (presets: demo" in err and err.count("\n") == 1


def test_a_pipeline_extends_another_section_by_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("base.yaml").write_text("run_dir: a\nstages: [prepare]\ntrain_lm: {n_layer: 2, lr: 0.01}\n")
    Path("child.yaml").write_text("extends: base.yaml\nrun_dir: b\ntrain_lm: {lr: 0.5}\n")
    assert load_pipeline("child.yaml") == {"run_dir": "b", "stages": ["prepare"], "train_lm": {"n_layer": 2, "lr": 0.5}}
    wt2, mom = load_pipeline("wt2"), load_pipeline("wt2-mom")  # a preset extends a preset by name
    assert mom["index"] == wt2["index"] and mom["train_lm"]["max_steps"] == wt2["train_lm"]["max_steps"]
    assert mom["train_lm"]["arch"] == "mom" and mom["run_dir"] != wt2["run_dir"]
    Path("loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(UsageError, match="extends itself"):
        load_pipeline("loop.yaml")


def test_a_stage_takes_its_section_of_a_pipeline_file(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"extends: demo\nrun_dir: {tmp_path / 'r'}\nprepare: {{train_tokenizer: 300}}\n")
    code, _, err = run_cli(capsys, "prepare", "--config", str(pipeline), "--threads", "1")
    assert code == 0, err
    assert RunDir(tmp_path / "r").require("prepare").config.train_tokenizer == 300


def test_a_stage_says_it_was_built_or_reused_and_quiet_silences_it(tmp_path, capsys):
    argv = ["prepare", "--run-dir", str(tmp_path / "r"), "--train-tokenizer", "300", "--threads", "1"]
    before = torch.get_num_threads()
    try:
        code, _, err = run_cli(capsys, *argv)
        assert code == 0 and err.count("prepare: done in") == 1 and "tokenize train" in err
        assert torch.get_num_threads() == 1  # --threads reached torch (and FAISS) before the stage ran
        assert RunDir(tmp_path / "r").read("prepare").environment.threads == 1  # and the manifest records it
        code, _, err = run_cli(capsys, *argv)
        assert code == 0 and err.count("prepare: reused") == 1
        code, _, err = run_cli(capsys, "-q", *argv)
        assert code == 0 and err == ""
        code, _, err = run_cli(capsys, *argv, "--log-level", "warning")
        assert code == 0 and err == ""
    finally:
        torch.set_num_threads(before)


def test_threads_default_to_the_cores_this_process_may_use():
    before = torch.get_num_threads()
    try:
        assert set_threads(None) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads() == faiss.omp_get_max_threads()
    finally:
        torch.set_num_threads(before)
    for spec in STAGES:  # every command takes --threads, and it never changes what a stage builds
        assert "threads" in spec.config.model_fields and "threads" not in spec.config.identity_fields()


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_config_yaml_round_trips(spec):
    required = {"prepare": {"tokenizer": "gpt2"}, "export": {"out_dir": "x"}, "lm-eval": {"model": "x", "tasks": ["t"]}}
    data = required.get(spec.name, {})
    config = validate(spec.config, data)
    assert validate(spec.config, yaml.safe_load(to_yaml(config))) == config


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
    code, _, err = run_cli(
        capsys,
        "prepare",
        "--corpus",
        str(tmp_path / "none.txt"),
        "--train-tokenizer",
        "300",
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert code == 2 and "corpus not found" in err and err.count("\n") == 1


def test_stage_before_its_inputs_says_what_to_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-lm", "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "run `mlpmem prepare" in err


def test_run_overrides_reach_the_stage_config(tmp_path):
    from mlpmem.cli import apply_overrides

    data = apply_overrides(
        load_yaml(preset_path("demo")),
        ["--train-lm.max-steps", "7", "--stages", "prepare", "train-lm", "--evaluate.lmbdas", "0.8", "0.9"],
    )
    run = validate(RunConfig, data)
    assert run.stage_config("train-lm").max_steps == 7 and run.stages == ["prepare", "train-lm"]
    assert run.stage_config("evaluate").lmbdas == [0.8, 0.9]


def test_a_typo_for_a_stage_not_run_is_still_refused(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "run",
        "demo",
        "--run_dir",
        str(tmp_path / "r"),
        "--train_lm.bogus_key",
        "5",
        "--stages",
        "prepare",
    )
    assert code == 2 and "--train_lm.bogus-key: unknown key" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "--lmbdas", "0.5", "1.5"], "less than or equal to 1"),
        (["evaluate", "--lmbdas", "nan"], "finite number"),
        (["evaluate", "--knn-temperatures", "0"], "greater than 0"),
        (["train-lm", "--lr", "inf"], "finite number"),
        (["bench", "--datastore-sizes", "0"], "greater than or equal to 1000"),
        (["train-memory", "--key-layer", "x", "--key-depth", "0.7"], "not both"),
    ],
)
def test_bad_values_are_refused_before_any_work(argv, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, *argv, "--run-dir", str(tmp_path / "r"))
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_a_config_path_that_is_a_directory_or_binary_is_one_line(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00binary")
    for path, message in ((tmp_path, "is a directory"), (tmp_path / "bin.yaml", "not UTF-8")):
        code, _, err = run_cli(capsys, "run", str(path))
        assert code == 2 and message in err and err.count("\n") == 1


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from mlpmem import __version__

    with pytest.raises(SystemExit):
        build_parser().parse_args(["-V"])
    assert capsys.readouterr().out.strip() == f"mlpmem {__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "mlpmem", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"mlpmem {__version__}"


def test_actions_without_run_dir_say_which_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "bench", "--quick")
    assert code == 2 and "pass --run-dir RUN" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--run_dir", "RUN", "stray", "--stages", "prepare"], "--run_dir takes one value, got 2: RUN stray"),
        (["--run_dir", "RUN", "--stages", "prepare", "--prepare.corpus", "x.txt", "stray"], "--prepare.corpus takes"),
        (["--run_dir", "RUN", "--stages", "[prepare,"], "--stages: '[prepare,' is not a YAML list"),
    ],
    ids=["after-run-dir", "after-a-section-key", "broken-stages-list"],
)
def test_run_refuses_stray_words_and_a_broken_stages_list(extra, message, tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    code, _, err = run_cli(capsys, "run", "demo", *[run_dir if a == "RUN" else a for a in extra])
    assert code == 2 and message.replace("RUN", run_dir) in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_path_the_file_system_cannot_name_is_one_line(tmp_path, capsys):
    long = str(tmp_path / ("a" * 300))
    for argv in (["prepare", "--train-tokenizer", "300", "--run-dir", long], ["run", "demo", "--run_dir", long]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "--run-dir: a name in it is 300 bytes long" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "export", "--run-dir", str(tmp_path / "r"), "--out", long)
    assert code == 2 and "--out-dir: a name in it is 300 bytes long" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    # a path no config field checks (a corpus) still ends in one line
    code, _, err = run_cli(
        capsys, "prepare", "--train-tokenizer", "300", "--run-dir", str(tmp_path / "r"), "--corpus", long
    )
    assert code == 2 and "File name too long" in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "prepare").exists()


def test_run_and_verify_take_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    argv = ["run", "demo", "--run_dir", str(tmp_path / "r"), "--stages", "prepare", "--prepare.train_tokenizer", "300"]
    try:
        torch.set_num_threads(2)
        code, _, err = run_cli(capsys, *argv, "--threads", "1")
        assert code == 0, err
        assert RunDir(tmp_path / "r").read("prepare").environment.threads == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        assert main(["verify", str(tmp_path / "r"), "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--threads", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--threads: must be an integer >= 1" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["export", "--run-dir", "RUN", "--out", "OUT"], "--out-dir"),
        (["bench", "--run-dir", "RUN", "--out", "OUT"], "--out-dir"),
        (["lm-eval", "--model", "RUN", "--tasks", "t", "--out-path", "OUT"], "--out-path"),
    ],
    ids=["export", "bench", "lm-eval"],
)
def test_an_unwritable_output_is_refused_before_any_work(argv, flag, tmp_path, capsys):
    """The output is checked first: the run (here: none at all) is never read, nothing is written."""
    (tmp_path / "file").write_text("a file, not a folder")
    out, run_dir = tmp_path / "file" / "out", tmp_path / "run"
    code, _, err = run_cli(capsys, *[{"RUN": str(run_dir), "OUT": str(out)}.get(a, a) for a in argv])
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flag}: cannot write {out}: {tmp_path / 'file'} is a file, not a folder" in err
    assert {p.name for p in tmp_path.iterdir()} <= {"file", "run"}  # the run's lock aside, nothing written
    assert all(p.name.startswith(".lock") for p in run_dir.glob("*")) and (tmp_path / "file").is_file()


def test_lm_eval_refuses_a_folder_as_its_out_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "lm-eval", "--model", "m", "--tasks", "t", "--out-path", str(tmp_path))
    assert code == 2 and f"--out-path: {tmp_path} is a folder" in err and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    code, _, err = run_cli(capsys, "export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "ro" / "x"))
    assert code == 2 and "--out-dir: cannot write" in err and "Permission denied" in err


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_export_refuses_the_current_folder_or_one_holding_it(out, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, _, err = run_cli(capsys, "export", "--run-dir", str(tmp_path / "run"), "--out", out)
    assert code == 2 and "is the current folder or holds it" in err and err.count("\n") == 1
    assert list(here.iterdir()) == [] and {p.name for p in tmp_path.iterdir()} <= {"here", "run"}  # run: its lock


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_user_chose(monkeypatch, tmp_path, preset, expected):
    """Every command sets OMP_WAIT_POLICY first (before a command imports torch), and keeps a user's own choice."""
    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    main(["verify", str(tmp_path / "no-run")])
    assert os.environ["OMP_WAIT_POLICY"] == expected


def test_library_chatter_stays_off_even_at_debug(tmp_path, caplog):
    """--log-level debug shows mlpmem's own lines, not the libraries' (bm25s logs its index building)."""
    import logging

    main(["--log-level", "debug", "verify", str(tmp_path / "no-run")])
    for name in ("bm25s", "faiss", "accelerate", "datasets"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
