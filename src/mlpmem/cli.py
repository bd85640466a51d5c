"""The ``mlpmem`` command: one subcommand per stage, thin (parse → typed config → call), plus ``run``.

    mlpmem prepare --corpus wikitext-2-slice --train-tokenizer 4096 --run-dir runs/demo
    mlpmem train-lm --config my.yaml --max-steps 500
    mlpmem run configs/demo.yaml --train_lm.max_steps 50

Flags are the config fields (``--max-steps`` or ``--max_steps``); values are read as YAML scalars or lists
(``--lmbdas "[0.1, 0.25]"``, ``--knn false``). User mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml

from mlpmem import __version__
from mlpmem.config import STAGES, RunConfig, StageConfig, load_yaml, validate
from mlpmem.errors import UsageError

# stage → "module:function" taking the stage's config and returning its manifest / results
STAGE_FUNCTIONS = {
    "prepare": "mlpmem.data.prepare:prepare",
    "train-lm": "mlpmem.lm.train:train_lm",
    "datastore": "mlpmem.knn.datastore:build_datastore",
    "index": "mlpmem.knn.index:build_index",
    "targets": "mlpmem.knn.targets:build_targets",
    "train-memory": "mlpmem.memory.train:train_memory",
    "evaluate": "mlpmem.evaluate.run:evaluate",
    "generate": "mlpmem.inference.generation:generate_from_config",
    "bench": "mlpmem.bench.run:bench",
}
STAGE_HELP = {
    "prepare": "tokenize a corpus into train/valid/test token stores",
    "train-lm": "train the base LM (GPT-2 from scratch, or continue an HF model)",
    "datastore": "store keys (last FFN input) and next tokens of a split",
    "index": "build the FAISS index over the datastore keys",
    "targets": "kNN target distributions for every datastore entry",
    "train-memory": "train the MLP memory to imitate the kNN targets",
    "evaluate": "perplexity of base, kNN-LM, MLP memory and both",
    "generate": "generate text with the LM + MLP memory (and/or kNN-LM)",
    "bench": "decode latency, scoring throughput and storage: base, memory, kNN-LM, equal-size decoder",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def stage_function(stage: str):
    module, name = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def accepts_str(annotation: Any) -> bool:
    return annotation is str or str in typing.get_args(annotation)


def parse_value(raw: str, annotation: Any) -> Any:
    """A flag value read as YAML; kept as the raw string where the field takes text."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if accepts_str(annotation) and not isinstance(value, str | type(None)):
        return raw
    return value


def add_config_flags(parser: argparse.ArgumentParser, cls: type[StageConfig]) -> None:
    for name, field in cls.model_fields.items():
        aliases = (field.json_schema_extra or {}).get("cli_aliases", []) if isinstance(field.json_schema_extra, dict) else []
        flags = sorted({f"--{name.replace('_', '-')}", f"--{name}", *aliases})
        default = field.default if field.default is not None else "none"
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}  # bare --quick means true
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="VALUE", **switch,
                            help=f"{field.description} (default: {default})")


def stage_config(stage: str, args: argparse.Namespace) -> StageConfig:
    """YAML file (if any) overlaid with the flags given, validated."""
    cls = STAGES[stage]
    data = load_yaml(Path(args.config)) if args.config else {}
    for name, field in cls.model_fields.items():
        if hasattr(args, name):
            data[name] = parse_value(getattr(args, name), field.annotation)
    return validate(cls, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--section.key value`` pairs (dashes or underscores) onto a run config mapping."""
    if len(overrides) % 2:
        raise UsageError(f"override {overrides[-1]} has no value (use --section.key VALUE)")
    for flag, raw in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise UsageError(f"unexpected argument {flag!r} (use --section.key VALUE)")
        path = flag[2:].replace("-", "_").split(".")
        if path[0] == "stages" and len(path) == 1:
            data["stages"] = yaml.safe_load(raw) if raw.startswith("[") else raw.split(",")
            continue
        if len(path) == 1:
            data[path[0]] = raw
            continue
        if len(path) != 2:
            raise UsageError(f"override {flag} must be --section.key")
        section = data.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise UsageError(f"override {flag}: {path[0]} is not a section")
        field = STAGES.get(path[0].replace("_", "-"))
        annotation = field.model_fields[path[1]].annotation if field and path[1] in field.model_fields else None
        section[path[1]] = parse_value(raw, annotation) if annotation else yaml.safe_load(raw)
    return data


def run_pipeline(config_path: Path, overrides: list[str]) -> None:
    """Run the stages a config lists, in order; complete stages with unchanged inputs are skipped."""
    data = apply_overrides(load_yaml(config_path), overrides)
    run = validate(RunConfig, data)
    configs = {stage: run.stage_config(stage) for stage in run.stages}  # all problems before any work
    times = {}
    for stage in run.stages:
        print(f"== {stage}", file=sys.stderr, flush=True)
        t0 = time.time()
        stage_function(stage)(configs[stage])
        times[stage] = time.time() - t0
    from mlpmem.summary import print_run_summary

    print_run_summary(run.run_dir, times)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mlpmem", description="Retriever-pretrained MLP memory for causal LMs.")
    parser.add_argument("--version", action="version", version=f"mlpmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = sub.add_parser("run", help="run the stages listed in a pipeline YAML (configs/demo.yaml)")
    run.add_argument("config_path", type=Path, help="pipeline YAML: run_dir, stages and one section per stage")
    for stage, cls in STAGES.items():
        p = sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage])
        p.add_argument("--config", help="YAML file with this stage's fields; flags override it")
        add_config_flags(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "run":
        args, rest = parser.parse_known_args(argv)
    else:
        args, rest = parser.parse_args(argv), []
    quiet_libraries()
    try:
        if args.command == "run":
            run_pipeline(args.config_path, rest)
        else:
            config = stage_config(args.command, args)
            result = stage_function(args.command)(config)
            if args.command == "evaluate":
                from mlpmem.evaluate.report import format_table

                print(format_table(result["systems"]))
                print(f"results: {Path(config.run_dir) / 'evaluate' / 'results.json'}")
    except UsageError as err:
        print(f"mlpmem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlpmem: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


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
