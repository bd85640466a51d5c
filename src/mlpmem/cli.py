"""The ``mlpmem`` command: one subcommand per row of the stage table (``mlpmem.stages``), plus ``run`` and ``verify``.

    mlpmem prepare --corpus wikitext-2-slice --train-tokenizer 4096 --run-dir runs/demo
    mlpmem train-lm --config my.yaml --max-steps 500
    mlpmem run configs/demo.yaml --train_lm.max_steps 50 --stages prepare,train-lm
    mlpmem verify runs/demo

Thin: parse -> typed config -> call the stage function -> print its report. Flags are the config fields
(``--max-steps`` or ``--max_steps``); values are read as YAML scalars; list fields take several values
(``--lmbdas 0.1 0.25``) or one YAML list. User mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml

from mlpmem import __version__
from mlpmem.config import StageConfig, load_yaml, validate
from mlpmem.errors import UsageError
from mlpmem.stages import BUILD_STAGES, STAGES, RunConfig, stage_spec

RUNS_ROOT = Path("runs")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# flags from config fields ------------------------------------------------------------------------------------
def _args_of(annotation: Any) -> tuple[Any, ...]:
    return tuple(a for a in typing.get_args(annotation) if a is not type(None))


def accepts(annotation: Any, kind: type) -> bool:
    """Whether a field's type admits ``kind`` (str, list, bool...)."""
    origin = typing.get_origin(annotation)
    if annotation is kind or origin is kind:
        return True
    return any(accepts(a, kind) for a in _args_of(annotation)) if origin is not typing.Literal else False


def metavar(annotation: Any) -> str:
    """What a flag takes, for --help: INT, FLOAT, TEXT, PATH, {a,b}, or a list of those."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if origin is list:
        return metavar(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return "|".join(dict.fromkeys(metavar(a) for a in _args_of(annotation)))
    if origin is typing.Annotated:
        return metavar(typing.get_args(annotation)[0])
    return {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL", Path: "PATH"}.get(annotation, "VALUE")


def parse_value(raw: str | list[str], annotation: Any) -> Any:
    """A flag value read as YAML (several values: a list); text kept as given where the field takes text."""
    if isinstance(raw, list):
        if len(raw) > 1:
            return [
                parse_value(r, typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation)
                for r in raw
            ]
        raw = raw[0]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, list) and accepts(annotation, list):
        return value
    if typing.get_origin(annotation) is list and value is not None:
        return [value]  # one value for a list-only field
    if accepts(annotation, str) and not isinstance(value, str | type(None)):
        return raw
    return value


def add_config_flags(parser: argparse.ArgumentParser, cls: type[StageConfig]) -> None:
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags = sorted({f"--{name.replace('_', '-')}", f"--{name}", *extra.get("cli_aliases", [])})
        default = field.default if field.default is not None else "none"
        if field.annotation is bool:
            kind = {"nargs": "?", "const": "true"}  # bare --quick means true
        elif accepts(field.annotation, list):
            kind = {"nargs": "+"}
        else:
            kind = {}
        note = "" if extra.get("identity", True) else "; does not change what the stage builds"
        parser.add_argument(
            *flags,
            dest=name,
            default=argparse.SUPPRESS,
            metavar=metavar(field.annotation),
            **kind,
            help=f"{field.description} (default: {default}{note})",
        )


def stage_config(stage: str, args: argparse.Namespace) -> StageConfig:
    """YAML file (if any) overlaid with the flags given, validated."""
    cls = stage_spec(stage).config
    data = load_yaml(Path(args.config)) if args.config else {}
    for name, field in cls.model_fields.items():
        if hasattr(args, name):
            data[name] = parse_value(getattr(args, name), field.annotation)
    return validate(cls, data)


# mlpmem run --------------------------------------------------------------------------------------------------
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--section.key value [value ...]`` (dashes or underscores) onto a run config mapping."""
    pairs: list[tuple[str, list[str]]] = []
    for item in overrides:
        if item.startswith("--"):
            pairs.append((item, []))
        elif pairs:
            pairs[-1][1].append(item)
        else:
            raise UsageError(f"unexpected argument {item!r} (use --section.key VALUE)")
    for flag, values in pairs:
        if not values:
            raise UsageError(f"override {flag} has no value (use --section.key VALUE)")
        path = flag[2:].replace("-", "_").split(".")
        if path == ["stages"]:
            raw = " ".join(values)
            data["stages"] = (
                yaml.safe_load(raw) if raw.startswith("[") else [s for s in raw.replace(",", " ").split() if s]
            )
            continue
        if len(path) == 1:
            data[path[0]] = values[0]
            continue
        if len(path) != 2:
            raise UsageError(f"override {flag} must be --section.key")
        section = data.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise UsageError(f"override {flag}: {path[0]} is not a section")
        spec = next((s for s in STAGES if s.section == path[0]), None)
        field = spec.config.model_fields.get(path[1]) if spec else None
        section[path[1]] = parse_value(values, field.annotation if field else Any)
    return data


def run_pipeline(config_path: Path, overrides: list[str]) -> None:
    """Run the stages a config lists, in order; complete stages with unchanged inputs are reused."""
    from mlpmem.summary import print_run_summary

    data = apply_overrides(load_yaml(config_path), overrides)
    run = validate(RunConfig, data)
    configs = run.stage_configs()  # every section, before any work
    times, reused = {}, set()
    with lock_run(run.run_dir, f"mlpmem run {config_path}"):
        for stage in run.stages:
            print(f"== {stage}", file=sys.stderr, flush=True)
            t0 = time.time()
            manifest = stage_spec(stage).function()(configs[stage])
            times[stage] = time.time() - t0
            if manifest_reused(manifest, t0):
                reused.add(stage)
                print(f"{stage}: reused (complete, same config and inputs)", file=sys.stderr)
            else:
                print(f"{stage}: done in {times[stage]:.1f}s", file=sys.stderr)
    print_run_summary(run.run_dir, times, reused)


def manifest_reused(manifest: Any, started: float) -> bool:
    """A stage whose manifest completed before this command started was reused, not built."""
    return float(manifest.timings.get("completed_at", started + 1)) < started


# locking, default run directories ----------------------------------------------------------------------------
def lock_run(run_dir: Path, command: str):
    """The run directory's lock, taken by the main process only (other ranks of a launch work under it)."""
    import contextlib

    from mlpmem.artifacts import RunDir

    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        return contextlib.nullcontext()
    return RunDir(run_dir).lock(command)


def most_recent_run(root: Path = RUNS_ROOT) -> Path | None:
    """The run under ``root`` whose LM stage completed last."""
    candidates = [p.parent.parent for p in root.glob("*/train-lm/manifest.json")]
    return max(candidates, key=lambda p: (p / "train-lm" / "manifest.json").stat().st_mtime, default=None)


def default_run_dir(config: StageConfig, command: str) -> StageConfig:
    """For actions on a finished run (generate, bench): without --run-dir, the most recent complete run."""
    if "run_dir" in config.model_fields_set or (Path(config.run_dir) / "train-lm").exists():
        return config
    recent = most_recent_run()
    if recent is None:
        raise UsageError(
            f"no run found under {RUNS_ROOT}/; pass --run-dir RUN (e.g. runs/demo after `make demo`)", field=None
        )
    print(f"{command}: using {recent} (the most recent run; pass --run-dir to choose)", file=sys.stderr)
    return config.model_copy(update={"run_dir": recent})


# the parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mlpmem", description="Retriever-pretrained MLP memory for causal LMs.")
    parser.add_argument("-V", "--version", action="version", version=f"mlpmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the stages listed in a pipeline YAML (configs/demo.yaml)",
        description="Run the stages a pipeline YAML lists, in order, reusing complete ones. Overrides: "
        "--SECTION.KEY VALUE for any stage field (sections: "
        + ", ".join(stage_spec(s).section for s in BUILD_STAGES)
        + "), e.g. --train_lm.max_steps 50; --stages prepare,train-lm (or space-separated) runs a subset.",
    )
    run.add_argument("config_path", type=Path, help="pipeline YAML: run_dir, stages and one section per stage")
    verify = sub.add_parser("verify", help="check a run's manifests, file sizes and content hashes, and staleness")
    verify.add_argument("run_path", type=Path, help="run directory")
    for spec in STAGES:
        p = sub.add_parser(spec.name, help=spec.help, description=spec.help)
        p.add_argument("--config", help="YAML file with this stage's fields; flags override it")
        add_config_flags(p, spec.config)
    return parser


def execute(args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "run":
        run_pipeline(args.config_path, rest)
        return 0
    if args.command == "verify":
        from mlpmem.summary import verify

        problems = verify(args.run_path)
        print(f"{len(problems)} problem(s) found" if problems else "all stages verified")
        return 1 if problems else 0
    spec = stage_spec(args.command)
    config = stage_config(args.command, args)
    if not spec.builds and spec.upstream:
        config = default_run_dir(config, args.command)
    if spec.takes_lock:
        with lock_run(config.run_dir, f"mlpmem {args.command}"):
            result = spec.function()(config)
    else:
        result = spec.function()(config)
    if spec.reporter() is not None:
        spec.reporter()(result, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "run":
        args, rest = parser.parse_known_args(argv)
    else:
        args, rest = parser.parse_args(argv), []
    quiet_libraries()
    try:
        return execute(args, rest)
    except UsageError as err:
        print(f"mlpmem: error: {err.for_cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlpmem: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """Keep library chatter (weights-loading reports, hub warnings) off the user's terminal."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
