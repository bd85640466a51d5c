"""Pipeline presets shipped with the package: ``mlpmem run demo`` runs ``presets/demo.yaml``.

mlpmem run demo                    # a preset by name
mlpmem run my_pipeline.yaml        # or any pipeline YAML file (start from a copy of a preset)

A pipeline may start from another: ``extends: wt2`` (a preset name, or a YAML path relative to the file) takes that
pipeline and overlays this file's keys on it, field by field within each stage section.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from mlpmem.config import load_yaml
from mlpmem.errors import UsageError


def preset_names() -> list[str]:
    """The names of the shipped presets (their file names without ``.yaml``)."""
    folder = resources.files(__name__)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """The file of a shipped preset; UsageError listing the presets for an unknown name."""
    path = Path(str(resources.files(__name__) / f"{name.removesuffix('.yaml')}.yaml"))
    if not path.is_file():
        raise UsageError(f"no pipeline file or preset named {name!r} (presets: {', '.join(preset_names())})")
    return path


def resolve_pipeline(name_or_path: str | Path) -> Path:
    """A pipeline YAML: an existing file as given, else a preset of that name."""
    path = Path(name_or_path).expanduser()
    return path if path.exists() else preset_path(str(name_or_path))


def load_pipeline(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A pipeline's YAML mapping with its ``extends`` chain resolved (this file's keys win, section by section)."""
    path = resolve_pipeline(name_or_path).resolve()
    if path in _seen:
        raise UsageError(f"pipeline {path} extends itself (through {' -> '.join(p.name for p in _seen)})")
    data = load_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UsageError(f"{path}: extends must name one preset or YAML file, got {base!r}")
    relative = path.parent / base
    merged = load_pipeline(relative if relative.is_file() else base, (*_seen, path))
    for key, value in data.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_sections else value
    return merged
