"""Run directories: typed stage manifests, content hashes, atomic writes, resumable memmaps, safe swaps, a lock.

A run directory holds one folder per stage (its name is the stage's CLI command). Each folder has
``manifest.json``, a typed pydantic model (``mlpmem.manifests``): stage, config, fingerprints of its inputs,
environment, every array (file, dtype, shape) and, once complete, the size and sha256 of every file. A stage is
built in ``NAME.partial/`` and swapped into ``NAME/`` only when complete, so a refused, failed or killed command
never touches the finished version; a rerun with the same config and inputs resumes the partial build.

    run = RunDir("runs/demo")
    datastore = run.require("datastore")            # typed manifest, or "run `mlpmem datastore ...` first"
    keys = run.array("datastore", "keys")           # read-only memmap, size checked against its shape
    build = run.begin("targets", config, {"datastore": datastore.fingerprint})
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlpmem import __version__
from mlpmem.errors import UsageError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"  # a training stage's log: not content (its timings differ from run to run)
PARTIAL = ".partial"
LOCK = ".lock"
_UMASK = os.umask(0)
os.umask(_UMASK)


# writing ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk (or a file-size limit) while writing ``path`` into one UsageError line."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise UsageError(
                f"no space left writing {path} ({os.strerror(err.errno)}); free space and rerun to resume"
            ) from None
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UsageError(f"cannot write {path}: {os.strerror(err.errno)}") from None
        raise
    except RuntimeError as err:  # torch and FAISS report failed writes as RuntimeError
        text = str(err).lower()
        if any(
            s in text for s in ("no space", "file too large", "failed writing", "write failed", "fwrite", "disk quota")
        ):
            raise UsageError(f"no space left writing {path}; free space and rerun to resume") from None
        raise


def require_writable(path: Path, field: str, inside: bool = False) -> None:
    """UsageError naming ``field`` unless ``path`` can be written (created or replaced; ``inside``: files written
    in the folder ``path``), checked before a long command spends its time: the nearest existing folder must take
    a new file. The probe is an unnamed temporary file, so nothing is left behind."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    start = path if inside else path.parent
    folder = next(p for p in (start, *start.parents) if p.exists())
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: {folder} is a file, not a folder", field=field)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {path}: {os.strerror(err.errno or 0) or err} ({folder})", field=field) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_errors(path):
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


def remove_temp_files(folder: Path) -> None:
    """Delete the ``*.tmp`` files and folders a killed write left behind."""
    for path in Path(folder).rglob("*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# fingerprints -----------------------------------------------------------------------------------------------
def fingerprint_obj(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (16 hex digits)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: each file is hashed once per process


def file_sha256(path: Path) -> str:
    """Full sha256 of a file's content (cached per process while size and mtime stay the same)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def content_files(folder: Path) -> list[Path]:
    """The files that define a folder's content: hidden files, progress, metrics and checkpoints/ are skipped."""
    folder = Path(folder)
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name not in (MANIFEST, PROGRESS, METRICS)
        and not any(part.startswith(".") or part == "checkpoints" for part in p.relative_to(folder).parts)
    ]


def fingerprint_path(path: Path) -> str:
    """sha256 over a file, or over a directory's relative names and file contents (16 hex digits)."""
    path = Path(path)
    files = [(path.name, path)] if path.is_file() else [(str(p.relative_to(path)), p) for p in content_files(path)]
    h = hashlib.sha256()
    for name, file in files:
        h.update(name.encode())
        h.update(file_sha256(file).encode())
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """The mlpmem checkout's commit, when it runs from a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Environment(BaseModel):
    """What produced an artifact: package version and commit, Python and torch versions, platform, CPU threads and
    processes."""

    mlpmem: str
    git_commit: str | None = None
    python: str
    torch: str
    platform: str
    threads: int | None = None  # torch's CPU threads (the stage's --threads; FAISS uses as many)
    processes: int | None = None  # processes of the launch that built it (accelerate launch / torchrun; else 1)

    @classmethod
    def current(cls) -> Environment:
        import torch

        return cls(
            mlpmem=__version__,
            git_commit=git_commit(),
            python=platform.python_version(),
            torch=torch.__version__,
            platform=platform.platform(),
            threads=torch.get_num_threads(),
            processes=int(os.environ.get("WORLD_SIZE", "1")),
        )


# manifests --------------------------------------------------------------------------------------------------
def _plain_name(name: str) -> str:
    """A relative path that stays inside its folder (no absolute paths, no '..')."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or any(p in ("..", "") for p in parts) or "\\" in name:
        raise ValueError(f"file name {name!r} must stay inside its stage folder")
    return name


class ArraySpec(BaseModel):
    """A raw memmap file in a stage folder: its name, dtype and shape (the file has no header)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    dtype: str
    shape: list[int]

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        return _plain_name(v)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        try:
            np.dtype(v)
        except TypeError:
            raise ValueError(f"unknown dtype {v!r}") from None
        return v

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def open(self, folder: Path, mode: str = "r") -> np.memmap:
        """The memmap; UsageError naming the file when it is missing or its size does not match the shape."""
        path = Path(folder) / self.file
        if mode == "r":
            size = path.stat().st_size if path.is_file() else None
            if size != self.nbytes:
                found = "missing" if size is None else f"{size:,} bytes"
                raise UsageError(
                    f"{path} is {found}, its manifest says {self.nbytes:,} (shape {self.shape}, {self.dtype}); "
                    "rerun the stage"
                )
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.memmap(path, dtype=np.dtype(self.dtype), mode=mode, shape=tuple(self.shape))


class FileRecord(BaseModel):
    """Size and content hash of one file of a complete stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bytes: int
    sha256: str


MANIFESTS: dict[str, type[Manifest]] = {}  # stage name -> its manifest class (each registers itself on definition)
# where the stage manifests are defined: loaded by name when a stage is first looked up by name, as the stage
# table loads its entry functions (a static import would make this core module depend on what it serves)
MANIFEST_MODULE = "mlpmem.manifests"


class Manifest(BaseModel):
    """What every stage records; ``mlpmem.manifests`` adds each stage's own typed fields (and its config type).

    A subclass names its stage in ``STAGE`` and is registered under it: ``RunDir`` reads a stage through its
    manifest class (``run.require(DatastoreManifest)``, or the name of a registered one) and never imports the
    stage table.

    ``fingerprint`` (set at completion, over config, inputs and file hashes) is what downstream stages record
    in their ``inputs``; ``checksum`` covers the manifest itself, so an edited or damaged manifest is refused.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    STAGE: ClassVar[str | None] = None
    stage: str
    status: Literal["running", "complete"] = "running"
    config: Any = None
    inputs: dict[str, str] = Field(default_factory=dict)
    environment: Environment
    arrays: dict[str, ArraySpec] = Field(default_factory=dict)
    files: dict[str, FileRecord] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    disk_bytes: int | None = None  # bytes of the stage's files on disk (its few-KB manifest aside), at completion
    fingerprint: str | None = None
    checksum: str | None = None

    @field_validator("files")
    @classmethod
    def _files_inside(cls, files: dict[str, FileRecord]) -> dict[str, FileRecord]:
        for name in files:
            _plain_name(name)
        return files

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__dict__.get("STAGE"):
            MANIFESTS[cls.STAGE] = cls

    @classmethod
    def config_class(cls) -> Any:
        """The stage's config class (the type of ``config``)."""
        return cls.model_fields["config"].annotation

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def summary(self) -> dict[str, Any]:
        """Counts worth a column in the end-of-run summary (each stage's manifest names its own)."""
        return {}


def checksum(data: dict[str, Any]) -> str:
    """A manifest's checksum: the fingerprint of its JSON without the checksum itself."""
    return fingerprint_obj({k: v for k, v in data.items() if k != "checksum"})


# the run directory ------------------------------------------------------------------------------------------
def stage_name(stage: str | type[Manifest]) -> str:
    """The stage a name or a manifest class designates."""
    return stage.STAGE if isinstance(stage, type) else stage


def manifest_class(stage: str | type[Manifest]) -> type[Manifest]:
    """The manifest class of a stage (UsageError for a name no manifest class registered)."""
    if isinstance(stage, type):
        return stage
    if stage not in MANIFESTS:
        importlib.import_module(MANIFEST_MODULE)
    if stage not in MANIFESTS:
        raise UsageError(f"unknown stage {stage!r} (stages that build a folder: {', '.join(MANIFESTS)})")
    return MANIFESTS[stage]


class RunDir:
    """One run directory: typed access to its stage manifests and arrays, and the builder of new stages."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def folder(self, stage: str) -> Path:
        return self.path / stage

    def partial_folder(self, stage: str) -> Path:
        return self.path / f"{stage}{PARTIAL}"

    # reading ------------------------------------------------------------------------------------------------
    def read(self, stage: str | type[Manifest], folder: Path | None = None) -> Manifest | None:
        """The typed manifest of a stage folder (the finished one by default); None when it has none.

        UsageError when the manifest is not valid JSON, fails its schema or its checksum (edited or damaged).
        """
        cls, stage = manifest_class(stage), stage_name(stage)
        self.recover(stage)
        path = (folder or self.folder(stage)) / MANIFEST
        if not path.is_file():
            return None
        try:
            data = read_json(path)
            manifest = cls.model_validate(data)
        except (ValueError, ValidationError) as err:
            first = err.errors()[0] if isinstance(err, ValidationError) else None
            reason = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else "not JSON"
            raise UsageError(
                f"{path} is not a valid {stage} manifest ({reason}); rerun `mlpmem {stage}` or remove the folder"
            ) from None
        if manifest.checksum != checksum(data):  # over the JSON as written
            raise UsageError(
                f"{path} was modified or damaged (its checksum does not match); "
                f"rerun `mlpmem {stage}` or remove the folder"
            )
        if "run_dir" in type(manifest.config).model_fields:  # not stored: a run directory may be moved
            manifest.config = manifest.config.model_copy(update={"run_dir": self.path})
        return manifest

    def complete(self, stage: str | type[Manifest]) -> Manifest | None:
        """The stage's complete manifest, None when the stage was never built.

        A folder that exists without a complete manifest is an error, not an absent stage: results must not
        silently lose rows because a manifest was deleted.
        """
        manifest, stage = self.read(stage), stage_name(stage)
        if manifest is None and not self.folder(stage).exists():
            return None
        if manifest is None or not manifest.complete:
            raise UsageError(
                f"{self.folder(stage)} has no complete manifest; "
                f"rerun `mlpmem {stage} --run-dir {self.path}` or remove the folder"
            )
        self.check_files(stage, manifest, hashes="small")
        return manifest

    def require(self, stage: str | type[Manifest]) -> Manifest:
        """The complete typed manifest of an upstream stage (files checked), or what to run first."""
        manifest, stage = self.read(stage), stage_name(stage)
        if manifest is None or not manifest.complete:
            raise UsageError(
                f"{self.folder(stage)} is missing or incomplete; run `mlpmem {stage} --run-dir {self.path}` first"
            )
        self.check_files(stage, manifest, hashes="small")
        self.check_not_stale(stage, manifest)
        return manifest

    def check_files(self, stage: str, manifest: Manifest, hashes: Literal["none", "small", "all"] = "small") -> None:
        """Every recorded file exists with its size; content hashes too (``small``: every file but raw arrays)."""
        folder = self.folder(stage)
        arrays = {spec.file for spec in manifest.arrays.values()}
        for name, record in manifest.files.items():
            path = folder / name
            if not path.is_file():
                raise UsageError(f"{path} is missing; rerun `mlpmem {stage} --run-dir {self.path}`")
            size = path.stat().st_size
            if size != record.bytes:
                raise UsageError(
                    f"{path} has {size:,} bytes, its manifest says {record.bytes:,} (truncated or replaced); "
                    f"rerun `mlpmem {stage}`"
                )
            if hashes == "all" or (hashes == "small" and name not in arrays):
                if file_sha256(path) != record.sha256:
                    raise UsageError(
                        f"{path} does not match its recorded content hash (corrupted or replaced); "
                        f"rerun `mlpmem {stage}`"
                    )

    def check_not_stale(self, stage: str, manifest: Manifest) -> None:
        """A stage built from an upstream version that has since been rebuilt is refused (every stage its inputs
        name)."""
        for upstream, recorded in manifest.inputs.items():
            if upstream not in MANIFESTS:  # the fingerprint of a model or tokenizer, not of a stage
                continue
            current = self.read(upstream)
            if current is None or current.fingerprint != recorded:
                raise UsageError(
                    f"{self.folder(stage)} was built from another version of {upstream}; "
                    f"rerun `mlpmem {stage} --run-dir {self.path}`"
                )

    def array(self, stage: str, name: str, manifest: Manifest | None = None) -> np.memmap:
        """A read-only memmap of an array of a complete stage."""
        manifest = manifest or self.require(stage)
        if name not in manifest.arrays:
            raise UsageError(f"{self.folder(stage) / MANIFEST} records no array {name!r}; rerun `mlpmem {stage}`")
        return manifest.arrays[name].open(self.folder(stage))

    def file(self, stage: str, name: str) -> Path:
        """The path of a file of a stage; names from manifests never leave the stage folder."""
        folder = self.folder(stage).resolve()
        try:
            path = (folder / _plain_name(name)).resolve()
        except ValueError as err:
            raise UsageError(str(err)) from None
        if folder not in path.parents:
            raise UsageError(f"file name {name!r} must stay inside its stage folder {folder} (a link leads out)")
        return path

    # building -----------------------------------------------------------------------------------------------
    def _same_identity(self, stage: str, manifest: Manifest | None, config: Any, inputs: dict[str, str]) -> bool:
        if manifest is None:
            return False
        recorded = {
            "config": manifest_class(stage).config_class().identity_of(manifest.config),
            "inputs": manifest.inputs,
        }
        return fingerprint_obj(recorded) == fingerprint_obj({"config": config.identity(), "inputs": inputs})

    def refuse_replacing(self, stage: str, config: Any, inputs: dict[str, str]) -> None:
        """A finished stage that later stages were built (or began) from is not replaced by a different one (another
        config, or changed inputs such as a corpus's text or a model's files) unless ``config.replace``: they would
        be left stale without a word. A stage already stale (an upstream stage was rebuilt since) is free."""
        old = self.read(stage)
        if old is None or not old.complete or getattr(config, "replace", False):
            return
        if any(name in MANIFESTS and recorded != inputs.get(name) for name, recorded in old.inputs.items()):
            return
        before, now = manifest_class(stage).config_class().identity_of(old.config), config.identity()
        changed = [f"--{k.replace('_', '-')}" for k in now if before.get(k) != now[k]]
        changed += [f"its input {k}" for k in sorted({*old.inputs, *inputs}) if old.inputs.get(k) != inputs.get(k)]
        built = self.built_from(stage, old.fingerprint)
        if changed and built:
            raise UsageError(
                f"{self.folder(stage)} is a finished {stage} that {', '.join(built)} "
                f"{'was' if len(built) == 1 else 'were'} built from, and this {stage} differs ({', '.join(changed)}): "
                "use a new --run-dir, or --replace to rebuild it (the later stages are then rebuilt when rerun)"
            )

    def built_from(self, stage: str, fingerprint: str | None) -> list[str]:
        """The stages whose finished or partial folder records this version (``fingerprint``) of ``stage`` among
        its inputs, in stage order."""
        names = {p.parent.name.removesuffix(PARTIAL) for p in self.path.glob(f"*/{MANIFEST}")} - {stage}
        found = set()
        for name in names & set(MANIFESTS):
            for folder in (self.folder(name), self.partial_folder(name)):
                manifest = self.read(name, folder) if (folder / MANIFEST).is_file() else None
                if manifest is not None and manifest.inputs.get(stage) == fingerprint:
                    found.add(name)
        return [name for name in MANIFESTS if name in found]

    def reusable(self, stage: str, config: Any, inputs: dict[str, str]) -> Manifest | None:
        """The stage's complete manifest when it was built with the same config identity and inputs (files
        checked), else None. Lets a stage return early before loading anything heavy."""
        final = self.read(stage)
        if final is not None and final.complete and self._same_identity(stage, final, config, inputs):
            self.check_files(stage, final, hashes="small")
            return final
        return None

    def begin(self, stage: str, config: Any, inputs: dict[str, str]) -> StageBuild:
        """Skip (complete with the same config identity and inputs), resume a partial build, or start one.

        Nothing in the finished ``STAGE/`` folder is touched: a new version is built in ``STAGE.partial/``.
        """
        if (final := self.reusable(stage, config, inputs)) is not None:
            return StageBuild(self, stage, final, self.folder(stage), "complete")
        if self.folder(stage).is_symlink():
            raise UsageError(
                f"{self.folder(stage)} is a link to {os.readlink(self.folder(stage))}, shared with another run: "
                f"refusing to rebuild it (use the config it was built with, or replace the link by a folder)"
            )
        partial_dir = self.partial_folder(stage)
        partial = self.read(stage, partial_dir) if partial_dir.exists() else None
        if partial is not None and self._same_identity(stage, partial, config, inputs) and not partial.complete:
            remove_temp_files(partial_dir)
            attempts = int(partial.timings.get("attempts", 1)) + 1  # this build was killed attempts - 1 times
            partial.timings = {**partial.timings, "attempts": attempts}
            return StageBuild(self, stage, partial, partial_dir, "resume")
        shutil.rmtree(partial_dir, ignore_errors=True)
        with disk_errors(partial_dir):
            partial_dir.mkdir(parents=True)
        manifest = manifest_class(stage)(
            stage=stage, config=config.model_copy(), inputs=inputs, environment=Environment.current()
        )
        build = StageBuild(self, stage, manifest, partial_dir, "fresh")
        build.manifest.timings = {"first_started_at": round(build.started, 3), "attempts": 1}
        build.save()
        return build

    def join(self, stage: str) -> StageBuild:
        """The build another process (rank 0) began: its partial folder, or the finished stage."""
        partial = self.read(stage, self.partial_folder(stage))
        if partial is not None:
            return StageBuild(self, stage, partial, self.partial_folder(stage), "resume")
        final = self.read(stage)
        if final is None:
            raise UsageError(f"{self.folder(stage)}: the main process did not start the stage")
        return StageBuild(self, stage, final, self.folder(stage), "complete" if final.complete else "resume")

    def recover(self, stage: str) -> None:
        """Finish a swap that a kill interrupted (see ``StageBuild.complete``)."""
        old = self.path / f".{stage}.old"
        if not old.exists():
            return
        final, partial = self.folder(stage), self.partial_folder(stage)
        if not final.exists():
            if (partial / MANIFEST).is_file() and read_json(partial / MANIFEST).get("status") == "complete":
                os.replace(partial, final)
            else:
                os.replace(old, final)
                return
        shutil.rmtree(old, ignore_errors=True)

    # locking ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the run directory for one command; a second command is refused, naming the holder."""
        from filelock import FileLock, Timeout

        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"run directory {self.path} is a file, not a folder")
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / LOCK, timeout=0)
            lock.acquire()
        except Timeout:
            holder = self.path / f"{LOCK}.holder.json"
            who = read_json(holder) if holder.is_file() else {}
            raise UsageError(
                f"{self.path} is in use by `{who.get('command', 'another mlpmem command')}` "
                f"(pid {who.get('pid', '?')} on {who.get('host', '?')}, since {who.get('since', '?')}); "
                "wait for it or use another --run-dir"
            ) from None
        except PermissionError:
            raise UsageError(f"cannot write to run directory {self.path}: permission denied") from None
        except OSError as err:
            raise UsageError(f"cannot use run directory {self.path}: {os.strerror(err.errno or 0) or err}") from None
        try:
            atomic_write_json(
                self.path / f"{LOCK}.holder.json",
                {
                    "command": command,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "argv": sys.argv,
                },
            )
            yield
        finally:
            (self.path / f"{LOCK}.holder.json").unlink(missing_ok=True)
            lock.release()
            if created and {p.name for p in self.path.iterdir()} <= {LOCK}:  # refused before writing: leave no trace
                (self.path / LOCK).unlink(missing_ok=True)
                self.path.rmdir()


class StageBuild:
    """A stage being built (or found complete): its folder, typed manifest and chunk progress."""

    def __init__(self, run: RunDir, stage: str, manifest: Manifest, folder: Path, status: str):
        self.run, self.stage, self.manifest, self.dir, self.status = run, stage, manifest, folder, status
        self.started = time.time()

    def add_array(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.memmap:
        """Create (or reopen on resume) a raw memmap recorded in the manifest; returns it writable.

        The file's blocks are reserved up front, so a full disk fails here with one line instead of killing
        the process (SIGBUS) when a later write reaches an unbacked page.
        """
        spec = ArraySpec(file=f"{name}.bin", dtype=str(np.dtype(dtype)), shape=[int(s) for s in shape])
        path = self.dir / spec.file
        if self.manifest.arrays.get(name) == spec and path.is_file() and path.stat().st_size == spec.nbytes:
            return spec.open(self.dir, "r+")
        with disk_errors(path):
            with open(path, "wb") as fh:
                if spec.nbytes:
                    os.posix_fallocate(fh.fileno(), 0, spec.nbytes)
        self.manifest.arrays = {**self.manifest.arrays, name: spec}
        self.save()
        return spec.open(self.dir, "r+")

    def save(self) -> None:
        data = self.manifest.model_dump(mode="json", exclude={"checksum"})
        self.manifest.checksum = data["checksum"] = checksum(data)
        atomic_write_json(self.dir / MANIFEST, data)

    def complete(self, **fields: Any) -> Manifest:
        """Record file hashes, mark complete, and swap the build into place; returns the final manifest."""
        for name, value in fields.items():
            setattr(self.manifest, name, value)
        now = time.time()
        timings = {**self.manifest.timings, "seconds": round(now - self.started, 2), "completed_at": round(now, 3)}
        if "first_started_at" in timings:  # seconds: this attempt's; since_first_start: the wall time of every attempt
            timings["since_first_start"] = round(now - timings["first_started_at"], 2)
        self.manifest.timings = timings
        (self.dir / PROGRESS).unlink(missing_ok=True)
        remove_temp_files(self.dir)
        self.manifest.files = {
            str(p.relative_to(self.dir)): FileRecord(bytes=p.stat().st_size, sha256=file_sha256(p))
            for p in content_files(self.dir)
        }
        self.manifest.status = "complete"
        self.manifest.disk_bytes = sum(r.bytes for r in self.manifest.files.values())
        self.manifest.fingerprint = fingerprint_obj(
            {
                "stage": self.stage,
                "config": self.manifest.config.identity(),
                "inputs": self.manifest.inputs,
                "files": {k: v.sha256 for k, v in self.manifest.files.items()},
            }
        )
        self.save()
        shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)  # kept until now: a kill before resumes from them
        if self.dir != self.run.folder(self.stage):
            final, old = self.run.folder(self.stage), self.run.path / f".{self.stage}.old"
            if final.exists():
                os.replace(final, old)
            os.replace(self.dir, final)
            shutil.rmtree(old, ignore_errors=True)
            self.dir = final
        return self.manifest

    # chunk-granular resume ----------------------------------------------------------------------------------
    def done_chunks(self) -> set[int]:
        path = self.dir / PROGRESS
        return set(read_json(path)["done"]) if path.exists() else set()

    def mark_chunk(self, index: int, done: set[int]) -> None:
        """Record chunk ``index`` as written (after its data was flushed)."""
        done.add(index)
        atomic_write_json(self.dir / PROGRESS, {"done": sorted(done)})
