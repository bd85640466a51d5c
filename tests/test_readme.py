"""The README (and docs/) as a newcomer runs it: every ``mlpmem ...`` command parses with the CLI and its config
validates (presets found, overrides known), every script, file and link it names exists, every ``make`` target is
in the Makefile, and the Python examples' imports work. Nothing is trained: what the commands build is tested
elsewhere."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from mlpmem.cli import apply_overrides, build_parser, stage_config
from mlpmem.config import validate
from mlpmem.presets import load_pipeline, preset_path
from mlpmem.stages import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b|[(|]|\.\.\.")  # SOURCE, NAME, (a | b), ...: a pattern, not a command


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """Fenced blocks as (language, lines)."""
    return [(lang, body.splitlines()) for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_lines(text: str) -> list[str]:
    """The commands of the plain fenced blocks, without trailing comments."""
    lines = []
    for lang, body in blocks(text):
        if lang == "":
            lines += [re.split(r"\s+#\s", line)[0].strip() for line in body if line.strip() and line[0] not in "#│└ "]
    return lines


def mlpmem_commands() -> list[tuple[str, str]]:
    """(document, command) for every mlpmem command shown in a fenced block or in inline code."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        inline = re.findall(r"`((?:\.venv/bin/)?mlpmem [^`]+)`", text)
        for command in [*shell_lines(text), *inline]:
            command = command.removeprefix(".venv/bin/")
            if command.startswith("mlpmem ") and not PLACEHOLDER.search(command):
                found.append((doc.name, command))
    return list(dict.fromkeys(found))


COMMANDS = mlpmem_commands()


def test_the_readme_shows_the_commands_a_newcomer_needs():
    shown = {command for _, command in COMMANDS}
    for needed in ("mlpmem run demo", "mlpmem run wt2"):
        assert needed in shown
    assert any(c.startswith("mlpmem generate --run-dir runs/demo") for c in shown)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".venv/bin/mlpmem" in readme and "source .venv/bin/activate" in readme  # how to reach the CLI
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU install line


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_every_mlpmem_command_parses_and_validates(doc, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as from a fresh directory: presets come from the package
    argv = shlex.split(command)[1:]
    if argv in (["-V"], ["--version"]):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(argv)
        assert done.value.code == 0
        return
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "run":
        if args.pipeline.endswith(".yaml") and "/" not in args.pipeline:  # "your own YAML, from a copy of a preset"
            shutil.copy(preset_path("demo"), args.pipeline)
        data = apply_overrides(load_pipeline(args.pipeline), rest)
        validate(RunConfig, data).stage_configs()
    else:
        assert not rest, f"unknown arguments {rest}"
        if args.command != "verify":
            stage_config(args.command, args)


def test_scripts_files_links_and_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for line in shell_lines(text):
            words = shlex.split(line) if "'" in line or '"' in line else line.split()
            if words[:1] == ["make"]:
                assert re.search(rf"^{words[1]}:", makefile, re.M), f"{doc.name}: no make target {words[1]}"
            scripts = [w for w in words if w.endswith(".py")]
            for script in scripts:
                assert (ROOT / script).is_file(), f"{doc.name}: {line}"
            if scripts and "--out" in words:  # a value is given: the line runs as written
                assert words.index("--out") + 1 < len(words) and not words[words.index("--out") + 1].startswith("-")
        for link in re.findall(r"\]\(([^)#:]+)\)", text):
            assert (doc.parent / link).exists(), f"{doc.name}: broken link {link}"


def test_python_examples_import():
    for doc in DOCS:
        for lang, body in blocks(doc.read_text(encoding="utf-8")):
            if lang == "python":
                imports = "\n".join(line for line in body if line.startswith(("from mlpmem", "import mlpmem")))
                namespace: dict = {}
                exec(imports, namespace)  # noqa: S102 - the README's own import lines
                for name, obj in namespace.items():
                    if name.startswith("__"):
                        continue
                    for attribute in re.findall(rf"\b{name}\.(\w+)", "\n".join(body)):
                        assert hasattr(obj, attribute), f"{doc.name}: {name}.{attribute}"
