"""Pipeline presets shipped with the package: ``mlpmem run demo`` runs ``presets/demo.yaml``.

mlpmem run demo                    # a preset by name
mlpmem run my_pipeline.yaml        # or any pipeline YAML file (start from a copy of a preset)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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
