"""The ``mlpmem`` command: one subcommand per row of the stage table (``mlpmem.stages``), plus ``run`` and ``verify``.

    mlpmem prepare --corpus wikitext-2-slice --train-tokenizer 4096 --run-dir runs/demo
    mlpmem train-lm --config my.yaml --max-steps 500
    mlpmem run demo --train_lm.max_steps 50 --stages prepare,train-lm
    mlpmem -q evaluate --run-dir runs/demo --threads 1
    mlpmem verify runs/demo

Thin: parse -> typed config -> call the stage function -> print its report. Flags are the config fields
(``--max-steps`` or ``--max_steps``); values are read as YAML scalars; list fields take several values
(``--lmbdas 0.1 0.25``) or one YAML list. User mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mlpmem import __version__
from mlpmem.artifacts import RunDir
from mlpmem.config import StageConfig, load_yaml, validate
from mlpmem.errors import UsageError
from mlpmem.presets import load_pipeline, preset_names
from mlpmem.progress import LOG_LEVELS, configure_output, main_process
from mlpmem.stages import BUILD_STAGES, STAGES, RunConfig, stage_spec

RUNS_ROOT = Path("runs")
log = logging.getLogger("mlpmem")


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
    if origin in (typing.Union, types.UnionType):
        return "|".join(dict.fromkeys(metavar(a) for a in _args_of(annotation)))
    if origin is typing.Annotated:
        return metavar(typing.get_args(annotation)[0])
    return {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL", Path: "PATH"}.get(annotation, "VALUE")


def parse_value(raw: str | list[str], annotation: Any) -> Any:
    """A flag value read as YAML (several values: a list; one value for a list-only field: a list of one); text
    kept as given where the field takes text (``--include '*.py'``, ``--corpus 123``)."""
    members = _args_of(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    list_type = next((m for m in (annotation, *members) if typing.get_origin(m) is list), None)
    element = typing.get_args(list_type)[0] if list_type is not None else annotation
    if isinstance(raw, list):
        if len(raw) > 1:
            return [parse_value(r, element) for r in raw]
        raw = raw[0]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, list) and list_type is not None:
        return value
    if list_type is not None and str not in members and value is not None:
        return [parse_value(raw, element)]  # one value for a field that takes only lists
    if accepts(annotation, str) and not isinstance(value, str | type(None)):
        return raw
    return value


def settings_group(annotation: Any) -> type[BaseModel] | None:
    """The model of a field that is a group of settings (``facts`` of prepare: ``--facts.n-people``), else None."""
    group = next((a for a in (annotation, *_args_of(annotation)) if isinstance(a, type)), None)
    return group if group is not None and issubclass(group, BaseModel) else None


def group_flags(parser: argparse.ArgumentParser, name: str, group: type[BaseModel]) -> None:
    """``--GROUP.FIELD`` flags (dest ``GROUP.FIELD``) for every field of a settings group."""
    for key, field in group.model_fields.items():
        flags = sorted({f"--{name.replace('_', '-')}.{key.replace('_', '-')}", f"--{name}.{key}"})
        kind = {"nargs": "+"} if accepts(field.annotation, list) else {}
        parser.add_argument(
            *flags,
            dest=f"{name}.{key}",
            default=argparse.SUPPRESS,
            metavar=metavar(field.annotation),
            **kind,
            help=f"{field.description} (default: {field.default})",
        )


def add_config_flags(parser: argparse.ArgumentParser, cls: type[StageConfig]) -> None:
    for name, field in cls.model_fields.items():
        if (group := settings_group(field.annotation)) is not None:
            group_flags(parser, name, group)
            continue
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
    spec = stage_spec(stage)
    cls = spec.config
    data = load_yaml(Path(args.config)) if args.config else {}
    if {"stages", "extends", spec.section} & set(data):  # a pipeline file: this stage's section and its run_dir
        pipeline = load_pipeline(args.config)
        data = {**({"run_dir": pipeline["run_dir"]} if "run_dir" in pipeline else {}), **pipeline.get(spec.section, {})}
    for name, field in cls.model_fields.items():
        if hasattr(args, name):
            data[name] = parse_value(getattr(args, name), field.annotation)
        if (group := settings_group(field.annotation)) is not None:
            given = {k: getattr(args, f"{name}.{k}") for k in group.model_fields if hasattr(args, f"{name}.{k}")}
            if given:
                data[name] = {**(data.get(name) or {}), **parse_group(given, group)}
    return validate(cls, data)


def parse_group(given: dict[str, Any], group: type[BaseModel]) -> dict[str, Any]:
    """Flag values of a settings group read as its fields' types (an unknown key is left for validation)."""
    fields = group.model_fields
    return {k: parse_value(v, fields[k].annotation if k in fields else Any) for k, v in given.items()}


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
            data["stages"] = parse_stages(" ".join(values))
            continue
        if len(path) == 1:
            data[path[0]] = one_value(flag, values)
            continue
        if len(path) not in (2, 3):
            raise UsageError(f"override {flag} must be --section.key (or --section.group.key)")
        section = data.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise UsageError(f"override {flag}: {path[0]} is not a section")
        spec = next((s for s in STAGES if s.section == path[0]), None)
        field = spec.config.model_fields.get(path[1]) if spec else None
        group = settings_group(field.annotation) if field else None
        if len(path) == 3:  # a settings group's field: --prepare.facts.n_people 500
            if group is None:
                raise UsageError(f"override {flag}: {path[0]}.{path[1]} is not a group of settings")
            key = group.model_fields.get(path[2])
            if key is not None and not accepts(key.annotation, list):
                values = [one_value(flag, values)]
            section[path[1]] = {**(section.get(path[1]) or {}), **parse_group({path[2]: values}, group)}
            continue
        if field is not None and not accepts(field.annotation, list):
            values = [one_value(flag, values)]
        section[path[1]] = parse_value(values, field.annotation if field else Any)
    return data


def one_value(flag: str, values: list[str]) -> str:
    """The value of a flag that takes one; a word after it (a stray argument) is refused, not dropped."""
    if len(values) > 1:
        raise UsageError(f"{flag} takes one value, got {len(values)}: {' '.join(values)} (a stray argument?)")
    return values[0]


def parse_stages(raw: str) -> Any:
    """``--stages`` as ``prepare,train-lm``, ``prepare train-lm`` or a YAML list ``[prepare, train-lm]``."""
    if not raw.startswith("["):
        return [s for s in raw.replace(",", " ").split() if s]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UsageError(
            f"--stages: {raw!r} is not a YAML list; write e.g. --stages prepare,train-lm or '[prepare, train-lm]'"
        ) from None


def run_pipeline(pipeline: str, overrides: list[str], threads: int | None = None) -> None:
    """Run the stages a pipeline (a YAML file or a preset name) lists, in order; complete stages with unchanged
    inputs are reused. ``threads`` (``--threads``) goes to every stage; a ``--SECTION.threads`` override wins."""
    from mlpmem.summary import print_run_summary

    data = load_pipeline(pipeline)
    if threads is not None:
        for name in BUILD_STAGES:
            section = data.setdefault(stage_spec(name).section, {})
            if isinstance(section, dict):
                section["threads"] = threads
    data = apply_overrides(data, overrides)
    run = validate(RunConfig, data)
    configs = run.stage_configs()  # every section, before any work
    times, reused = {}, set()
    with lock_run(run.run_dir, f"mlpmem run {pipeline}"):
        for stage in run.stages:
            log.info("== %s", stage)
            t0 = time.time()
            _, was_reused = call_stage(stage, configs[stage])
            times[stage] = time.time() - t0
            if was_reused:
                reused.add(stage)
    if main_process():
        print_run_summary(run.run_dir, times, reused)


def call_stage(stage: str, config: StageConfig) -> tuple[Any, bool]:
    """Run one stage or action with its CPU threads set: (its result, whether a complete stage was reused).

    A stage says in one line that it was built or reused."""
    from mlpmem.devices import set_threads  # torch: imported when a command runs, not for --help

    spec = stage_spec(stage)
    set_threads(config.threads)
    t0 = time.time()
    result = run_stage_function(spec, config)
    reused = spec.builds and manifest_reused(result, t0)
    if reused:
        log.info("%s: reused (complete, same config and inputs): %s", stage, Path(config.run_dir) / stage)
    elif spec.builds:
        log.info("%s: done in %.1fs: %s", stage, time.time() - t0, Path(config.run_dir) / stage)
    return result, reused


def run_stage_function(spec, config: StageConfig) -> Any:
    """The stage's function. Under a launch of several processes, a stage that does not share its work runs in the
    main process while the others wait, then read its manifest; an action (generate, bench...) is refused. The
    processes start a stage together: the main one has taken the run's lock (and finished any swap a kill
    interrupted) before the others read."""
    from mlpmem.distributed import check_launch, launched_processes, process_state

    check_launch()
    if launched_processes() == 1:
        return spec.function()(config)
    if not spec.builds and not spec.multi_process:
        raise UsageError(f"`mlpmem {spec.name}` runs in one process; start it without accelerate launch / torchrun")
    state, _ = process_state(getattr(config, "device", "auto"))
    state.wait_for_everyone()
    if spec.multi_process:
        return spec.function()(config)
    result = spec.function()(config) if state.is_main_process else None
    state.wait_for_everyone()
    return result if state.is_main_process else RunDir(config.run_dir).require(spec.name)


def manifest_reused(manifest: Any, started: float) -> bool:
    """A stage whose manifest completed before this command started was reused, not built."""
    return float(manifest.timings.get("completed_at", started + 1)) < started


# locking, default run directories ----------------------------------------------------------------------------
def lock_run(run_dir: Path, command: str):
    """The run directory's lock, taken by the main process only (other ranks of a launch work under it)."""
    if not main_process():
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
        raise UsageError(f"no run found under {RUNS_ROOT}/; pass --run-dir RUN (e.g. runs/demo after `make demo`)")
    log.info("%s: using %s (the most recent run; pass --run-dir to choose)", command, recent)
    return config.model_copy(update={"run_dir": recent})


# the parser --------------------------------------------------------------------------------------------------
def add_output_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """-q / --log-level, accepted before the command (``mlpmem -q run demo``) and after it."""
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="no progress output; log warnings and errors only (unless --log-level says otherwise)",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=None if top else argparse.SUPPRESS,
        help="log level of mlpmem and its libraries (default: info, or warning with --quiet)",
    )


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """--threads for the commands that take no stage config (run: every stage's; verify: its hashing)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="INT",
        help="CPU threads for torch and FAISS; default: the cores this process may use",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mlpmem", description="Retriever-pretrained MLP memory for causal LMs.")
    parser.add_argument("-V", "--version", action="version", version=f"mlpmem {__version__}")
    add_output_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    presets = ", ".join(preset_names())
    run = sub.add_parser(
        "run",
        help=f"run the stages a pipeline YAML or preset lists ({presets})",
        description="Run the stages a pipeline lists, in order, reusing complete ones. Overrides: "
        "--SECTION.KEY VALUE for any stage field (sections: "
        + ", ".join(stage_spec(s).section for s in BUILD_STAGES)
        + "), e.g. --train_lm.max_steps 50; --stages prepare,train-lm (or space-separated) runs a subset.",
    )
    run.add_argument(
        "pipeline", metavar="PIPELINE", help=f"a pipeline YAML file, or the name of a shipped preset ({presets})"
    )
    add_threads_flag(run)
    add_output_flags(run, top=False)
    verify = sub.add_parser("verify", help="check a run's manifests, file sizes and content hashes, and staleness")
    verify.add_argument("run_path", type=Path, help="run directory")
    add_threads_flag(verify)
    add_output_flags(verify, top=False)
    for spec in STAGES:
        p = sub.add_parser(spec.name, help=spec.help, description=spec.help)
        p.add_argument("--config", help="YAML file with this stage's fields; flags override it")
        add_config_flags(p, spec.config)
        add_output_flags(p, top=False)
    return parser


def execute(args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "run":
        run_pipeline(args.pipeline, rest, args.threads)
        return 0
    if args.command == "verify":
        from mlpmem.devices import set_threads
        from mlpmem.summary import verify

        set_threads(args.threads)

        problems = verify(args.run_path)
        print(f"{len(problems)} problem(s) found" if problems else "all stages verified")
        return 1 if problems else 0
    spec = stage_spec(args.command)
    config = stage_config(args.command, args)
    if not spec.builds and spec.upstream:
        config = default_run_dir(config, args.command)
    lock = lock_run(config.run_dir, f"mlpmem {args.command}") if spec.takes_lock else None
    with lock or contextlib.nullcontext():
        result, _ = call_stage(args.command, config)
    if spec.reporter() is not None:
        spec.reporter()(result, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    passive_openmp_waits()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":  # only `run` takes --section.key overrides
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    configure_output(args.log_level or ("warning" if args.quiet else "info"), quiet=args.quiet)
    quiet_libraries()
    try:
        return execute(args, rest)
    except UsageError as err:
        print(f"mlpmem: error: {err.for_cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlpmem: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:  # a path given on the command line that the OS cannot name (paths from configs are
        if err.errno != errno.ENAMETOOLONG:  # checked by config.nameable and name their flag)
            raise
        print(f"mlpmem: error: {os.strerror(err.errno)}: {err.filename}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped (`mlpmem ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def passive_openmp_waits() -> None:
    """OpenMP threads that finish a parallel region sleep instead of spinning (unless the user set a policy).

    Set before torch and FAISS load their OpenMP runtime, which reads it once. Spinning threads keep a core busy
    while they wait for a partner; when another multi-threaded job shares the cores, that partner is often
    descheduled, and every parallel region then waits out a time slice. Measured on 2 cores beside other jobs
    (load ~9): the demo's train-lm ran at 6.7 s/step by default and 1.3 s/step with passive waits."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_libraries() -> None:
    """Keep library chatter (weights-loading reports, hub warnings, hub progress bars, bm25s's index messages) off
    the user's terminal, whatever --log-level mlpmem's own lines take."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("bm25s", "faiss", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
