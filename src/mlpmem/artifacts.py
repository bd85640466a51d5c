"""Run directories, stage manifests, fingerprints, atomic writes and chunk-resumable memmaps.

A run directory holds one folder per stage. Each folder has ``manifest.json``: stage, config, fingerprints of
its inputs, package version, counts, arrays (dtype, shape, file), timings and status. A stage is complete only
when its manifest says so; arrays are raw memmaps (no header: dtype and shape live in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlpmem import __version__
from mlpmem.errors import UsageError

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
PROGRESS = "progress.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the permissions a plain write would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fingerprint_obj(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (16 hex digits)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_path(path: Path) -> str:
    """sha256 over a file, or over a directory's relative names and file contents (16 hex digits).

    Hidden files and ``checkpoints/`` folders are skipped: they do not define what a model is.
    """
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = [
            (str(p.relative_to(path)), p)
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") or part == "checkpoints" for part in p.relative_to(path).parts)
        ]
    h = hashlib.sha256()
    for name, file in files:
        h.update(name.encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """The mlpmem checkout's commit, when it runs from a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, str | None]:
    """What produced an artifact: package version and commit, Python and torch versions, platform."""
    import torch

    return {
        "mlpmem": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


@dataclass
class ArraySpec:
    """A raw memmap file in a stage folder: its name, dtype and shape."""

    file: str
    dtype: str
    shape: list[int]

    def open(self, folder: Path, mode: str = "r") -> np.memmap:
        return np.memmap(Path(folder) / self.file, dtype=np.dtype(self.dtype), mode=mode, shape=tuple(self.shape))


@dataclass
class Stage:
    """One stage folder of a run directory, and its manifest.

    ``begin`` decides between skip (complete with the same config and inputs), resume (started with the same
    config and inputs) and a fresh start (anything else: stale outputs are removed).
    """

    run_dir: Path
    name: str
    manifest: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def dir(self) -> Path:
        return Path(self.run_dir) / self.name

    def read(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        return read_json(path) if path.exists() else None

    def begin(self, config: dict[str, Any], inputs: dict[str, str]) -> str:
        """Returns 'complete', 'resume' or 'fresh'; writes a 'running' manifest unless complete."""
        identity = {"config": config, "inputs": inputs}
        old = self.read()
        if old is not None and fingerprint_obj({"config": old.get("config"), "inputs": old.get("inputs")}) == fingerprint_obj(identity):
            self.manifest = old
            if old.get("status") == "complete":
                return "complete"
            return "resume"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.manifest = {
            "stage": self.name,
            "status": "running",
            "config": config,
            "inputs": inputs,
            "environment": environment(),
            "arrays": {},
            "counts": {},
            "timings": {},
        }
        self.save()
        return "fresh"

    def add_array(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.memmap:
        """Create (or reopen on resume) a raw memmap recorded in the manifest; returns it writable."""
        spec = ArraySpec(file=f"{name}.bin", dtype=str(np.dtype(dtype)), shape=[int(s) for s in shape])
        path = self.dir / spec.file
        if name in self.manifest["arrays"] and path.exists():
            return spec.open(self.dir, "r+")
        self.manifest["arrays"][name] = spec.__dict__
        self.save()
        return spec.open(self.dir, "w+")

    def save(self) -> None:
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def complete(self, counts: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Mark the stage complete; its fingerprint (what downstream stages record) is fixed here."""
        self.manifest["counts"].update(counts or {})
        self.manifest.update(extra)
        self.manifest["timings"]["seconds"] = round(time.time() - self.started, 2)
        self.manifest["status"] = "complete"
        self.manifest["fingerprint"] = fingerprint_obj(
            {k: self.manifest.get(k) for k in ("stage", "config", "inputs", "counts", "arrays")}
        )
        self.save()
        (self.dir / PROGRESS).unlink(missing_ok=True)
        return self.manifest

    # chunk-granular resume ------------------------------------------------------------------------
    def done_chunks(self) -> set[int]:
        path = self.dir / PROGRESS
        return set(read_json(path)["done"]) if path.exists() else set()

    def mark_chunk(self, index: int, done: set[int]) -> None:
        """Record chunk ``index`` as written (after its data was flushed)."""
        done.add(index)
        atomic_write_json(self.dir / PROGRESS, {"done": sorted(done)})


def require_stage(run_dir: Path, name: str, hint: str) -> dict[str, Any]:
    """The complete manifest of an upstream stage, or UsageError telling what to run first."""
    manifest = Stage(Path(run_dir), name).read()
    if manifest is None or manifest.get("status") != "complete":
        raise UsageError(f"{Path(run_dir) / name} is missing or incomplete; run `{hint}` first")
    return manifest


def open_array(run_dir: Path, stage: str, name: str) -> np.memmap:
    """A read-only memmap of an array recorded in a complete stage's manifest."""
    manifest = require_stage(run_dir, stage, f"mlpmem {stage} --run-dir {run_dir}")
    spec = ArraySpec(**manifest["arrays"][name])
    return spec.open(Path(run_dir) / stage, "r")
