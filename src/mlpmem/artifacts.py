"""Run directories: typed stage manifests, content hashes, atomic writes, resumable memmaps, safe swaps, a lock.

A run directory holds one folder per stage (its name is the stage's CLI command). Each folder has
``manifest.json``, a typed pydantic model (``mlpmem.manifests``): stage, config, fingerprints of its inputs,
environment, every array (file, dtype, shape) and, once complete, the size, sha256 and identity (inode, times) of
every file. A stage is built in ``NAME.partial/`` and swapped into ``NAME/`` only when complete, so a refused,
failed or killed command never touches the finished version; a rerun with the same config and inputs resumes the
partial build, and a build killed after its complete manifest is swapped in, not rebuilt.

Writers hold the run's lock (``RunDir.lock``); only the holder renames stage folders, including finishing a swap
a kill interrupted. Readers never write: a lock-free reader (``generate``) that meets a swap in progress waits for
it. What the hashes protect against is accidental damage (a bad disk, a truncated copy, a stray edit, a file
replaced by another run's): the manifest checksum and the digests of resumable chunks are unkeyed, so whoever can
write the run directory can also forge them; they are no defence against a hostile editor.

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
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlpmem import __version__
from mlpmem.errors import UsageError
from mlpmem.progress import main_process

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"  # a training stage's log: not content (its timings differ from run to run)
PARTIAL = ".partial"
LOCK = ".lock"
SMALL_FILE_BYTES = 1 << 20  # files up to this size are hashed on every read (microseconds); larger ones when changed
SWAP_WAIT_SECONDS = 2.0  # a lock-free reader waits this long for a swap in progress (its renames take microseconds)
_UMASK = os.umask(0)
os.umask(_UMASK)
_HELD: dict[Path, list] = {}  # run directories whose lock this process holds -> [nesting depth, read_only]
log = logging.getLogger(__name__)


# writing ----------------------------------------------------------------------------------------------------
# how torch, FAISS and safetensors word a write the disk refused; torch's zip writer says "unexpected pos" (in
# inline_container.cc) when a write fell short of what it asked for, which on a full disk is its only message
_WRITE_FAILED = (
    "no space",
    "file too large",
    "failed writing",
    "write failed",
    "fwrite",
    "disk quota",
    "quota exceeded",
    "storagefull",
    "unexpected pos",
)


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
    except UsageError:
        raise
    except Exception as err:  # torch (RuntimeError), FAISS and safetensors report failed writes in their own types
        if any(s in str(err).lower() for s in _WRITE_FAILED):
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


def remove_folder(path: Path) -> None:
    """Delete a folder (or the link standing in its place); nothing when absent."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def check_inside(folder: Path, path: Path, hint: str) -> None:
    """UsageError when ``path`` (a file of ``folder``) is a link, or lies under one, that leads out of ``folder``:
    a read would use, and a resume would write, a file of another place."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target != root and root not in target.parents:
        raise UsageError(
            f"{path} is a link to {target}, outside {folder}: refusing to read or write through it; {hint}"
        )


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
def plain_name(name: str) -> str:
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
        return plain_name(v)

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
        """The memmap; UsageError naming the file when it is missing, its size does not match the shape, or it is a
        link leading out of its folder."""
        path = Path(folder) / self.file
        hint = f"remove {folder} and rerun `mlpmem {Path(folder).name.removesuffix(PARTIAL)}`"
        check_inside(folder, path, hint)
        if mode == "r":
            size = path.stat().st_size if path.is_file() else None
            if size != self.nbytes:
                found = "missing" if size is None else f"{size:,} bytes"
                raise UsageError(
                    f"{path} is {found}, its manifest says {self.nbytes:,} (shape {self.shape}, {self.dtype}); " + hint
                )
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.memmap(path, dtype=np.dtype(self.dtype), mode=mode, shape=tuple(self.shape))


class FileRecord(BaseModel):
    """Size, content hash and identity (inode, modification and change times) of one file of a complete stage.

    A read trusts a large file whose size and identity are the recorded ones (a write moves its times, a
    replacement its inode) and rehashes it in full when they changed; ``mlpmem verify`` rehashes every file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    bytes: int
    sha256: str
    inode: int | None = None  # None: recorded by an earlier version (its large arrays are checked by size)
    mtime_ns: int | None = None
    ctime_ns: int | None = None

    @classmethod
    def of(cls, path: Path, sha256: str | None = None) -> FileRecord:
        """The record of a file as it is now (``sha256``: its content hash, when just computed)."""
        st = Path(path).stat()
        return cls(
            bytes=st.st_size,
            sha256=sha256 or file_sha256(path),
            inode=st.st_ino,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    def same_identity(self, st: os.stat_result) -> bool:
        return self.inode is not None and (self.inode, self.mtime_ns, self.ctime_ns) == (
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


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
    in their ``inputs``; ``checksum`` covers the manifest itself, so a damaged or carelessly edited manifest is
    refused. It is unkeyed: it detects accidents, not a hostile editor (who can recompute it).
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
            plain_name(name)
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

    def aside_folder(self, stage: str) -> Path:
        """Where a swap moves the finished version while the new one takes its place."""
        return self.path / f".{stage}.old"

    def rebuild_hint(self, stage: str, folder: Path | None = None) -> str:
        return f"remove {folder or self.folder(stage)} and rerun `mlpmem {stage} --run-dir {self.path}`"

    # reading ------------------------------------------------------------------------------------------------
    def read(self, stage: str | type[Manifest], folder: Path | None = None) -> Manifest | None:
        """The typed manifest of a stage folder (the finished one by default); None when it has none.

        Never writes. A swap in progress (the finished version moved aside, the new one not yet in place) is
        waited for; one that a kill interrupted is reported (the next command that takes the lock finishes it).
        UsageError when the manifest is not valid JSON, fails its schema or its checksum (edited or damaged).
        """
        cls, stage = manifest_class(stage), stage_name(stage)
        folder = folder or self.folder(stage)
        path = folder / MANIFEST
        if folder == self.folder(stage) and not path.is_file():
            self._wait_for_swap(stage)
        if not path.is_file():
            return None
        try:
            data = read_json(path)
            manifest = cls.model_validate(data)
        except (ValueError, ValidationError) as err:
            first = err.errors()[0] if isinstance(err, ValidationError) else None
            reason = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else "not JSON"
            raise UsageError(
                f"{path} is not a valid {stage} manifest ({reason}); {self.rebuild_hint(stage, folder)}"
            ) from None
        if manifest.checksum != checksum(data):  # over the JSON as written
            raise UsageError(
                f"{path} was modified or damaged (its checksum does not match); {self.rebuild_hint(stage, folder)}"
            )
        if "run_dir" in type(manifest.config).model_fields:  # not stored: a run directory may be moved
            manifest.config = manifest.config.model_copy(update={"run_dir": self.path})
        return manifest

    def _wait_for_swap(self, stage: str) -> None:
        """Wait while STAGE/ is absent and its earlier version is moved aside (a swap between its two renames)."""
        aside = self.aside_folder(stage)
        deadline = time.monotonic() + (0.0 if self.holds_lock() else SWAP_WAIT_SECONDS)
        while aside.exists() and not (self.folder(stage) / MANIFEST).is_file():
            if time.monotonic() >= deadline:
                raise UsageError(
                    f"{self.folder(stage)} is missing: a command replacing it was interrupted (the earlier version "
                    f"is in {aside}); run `mlpmem {stage} --run-dir {self.path}` to finish the swap"
                )
            time.sleep(0.02)

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
                f"rerun `mlpmem {stage} --run-dir {self.path}` (it builds the stage anew) or remove the folder"
            )
        self.check_files(stage, manifest)
        return manifest

    def require(self, stage: str | type[Manifest]) -> Manifest:
        """The complete typed manifest of an upstream stage (files checked), or what to run first."""
        manifest, stage = self.read(stage), stage_name(stage)
        if manifest is None or not manifest.complete:
            raise UsageError(
                f"{self.folder(stage)} is missing or incomplete; run `mlpmem {stage} --run-dir {self.path}` first"
            )
        self.check_files(stage, manifest)
        self.check_not_stale(stage, manifest)
        return manifest

    def check_files(
        self,
        stage: str,
        manifest: Manifest,
        hashes: Literal["changed", "all"] = "changed",
        folder: Path | None = None,
    ) -> None:
        """Every recorded file exists inside the stage folder with its size and content hash.

        ``changed``: a large file whose identity (inode, modification and change times) is the recorded one is
        trusted without reading it (nothing wrote to it since); one whose identity changed is rehashed in full.
        Small files are always hashed. ``all`` (``mlpmem verify``) rehashes every file.
        """
        folder = folder or self.folder(stage)
        hint = self.rebuild_hint(stage, folder)
        arrays = {spec.file for spec in manifest.arrays.values()}
        moved: dict[str, FileRecord] = {}
        for name, record in manifest.files.items():
            path = folder / name
            check_inside(folder, path, hint)
            if not path.is_file():
                raise UsageError(f"{path} is missing; {hint}")
            st = path.stat()
            if st.st_size != record.bytes:
                raise UsageError(
                    f"{path} has {st.st_size:,} bytes, its manifest says {record.bytes:,} (truncated or replaced); "
                    + hint
                )
            unchanged = record.same_identity(st) or (record.inode is None and name in arrays)  # arrays of old runs
            if hashes == "all" or st.st_size <= SMALL_FILE_BYTES or not unchanged:
                if (digest := file_sha256(path)) != record.sha256:
                    raise UsageError(f"{path} does not match its recorded content hash (corrupted or replaced); {hint}")
                if not record.same_identity(st):
                    moved[name] = FileRecord.of(path, digest)
        if moved and folder == self.folder(stage):
            self._record_identities(stage, manifest, moved)

    def _record_identities(self, stage: str, manifest: Manifest, moved: dict[str, FileRecord]) -> None:
        """Re-record the identity of files whose content was rehashed and found intact (a copied run), so later
        reads trust them again: the lock holder only, never through a link to another run's stage. The manifest
        keeps its modification time (when the stage completed)."""
        folder = self.folder(stage)
        if not self.holds_lock(to_write=True) or folder.is_symlink():
            return
        manifest.files = {**manifest.files, **moved}
        path = folder / MANIFEST
        st = path.stat()
        write_manifest(path, manifest)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

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
            raise UsageError(f"{self.folder(stage) / MANIFEST} records no array {name!r}; {self.rebuild_hint(stage)}")
        return manifest.arrays[name].open(self.folder(stage))

    def file(self, stage: str, name: str) -> Path:
        """The path of a file of a stage; names from manifests never leave the stage folder."""
        folder = self.folder(stage).resolve()
        try:
            path = (folder / plain_name(name)).resolve()
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
        checked), else None. Lets a stage return early before loading anything heavy.

        The main process first finishes, under the lock, a build of the stage that a kill left complete but not
        swapped in (the other processes of a launch start after it did: ``mlpmem.cli``)."""
        if main_process():
            with self.lock(f"mlpmem {stage}", settle=False):
                self.finish_interrupted(stage)
        final = self.read(stage)
        if final is not None and final.complete and self._same_identity(stage, final, config, inputs):
            self.check_files(stage, final)
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
            self.check_no_links_out(stage, partial_dir)
            remove_temp_files(partial_dir)
            attempts = int(partial.timings.get("attempts", 1)) + 1  # this build was killed attempts - 1 times
            partial.timings = {**partial.timings, "attempts": attempts}
            return StageBuild(self, stage, partial, partial_dir, "resume")
        remove_folder(partial_dir)
        with disk_errors(partial_dir):
            partial_dir.mkdir(parents=True)
        manifest = manifest_class(stage)(
            stage=stage, config=config.model_copy(), inputs=inputs, environment=Environment.current()
        )
        build = StageBuild(self, stage, manifest, partial_dir, "fresh")
        build.manifest.timings = {"first_started_at": round(build.started, 3), "attempts": 1}
        build.save()
        return build

    def check_no_links_out(self, stage: str, folder: Path) -> None:
        """A partial build to resume holds no link leading out of it (a resume would write through it)."""
        for path in Path(folder).rglob("*"):
            if path.is_symlink():
                check_inside(folder, path, f"remove {folder} to start the stage afresh")

    def join(self, stage: str) -> StageBuild:
        """The build another process (rank 0) began: its partial folder, or the finished stage."""
        partial = self.read(stage, self.partial_folder(stage))
        if partial is not None:
            return StageBuild(self, stage, partial, self.partial_folder(stage), "resume")
        final = self.read(stage)
        if final is None:
            raise UsageError(f"{self.folder(stage)}: the main process did not start the stage")
        return StageBuild(self, stage, final, self.folder(stage), "complete" if final.complete else "resume")

    # swapping (the lock holder only) --------------------------------------------------------------------------
    def finish_interrupted(self, stage: str) -> None:
        """Finish what a kill left between a build's complete manifest and the end of its swap: a complete, intact
        build in STAGE.partial/ is swapped in (not rebuilt); else a finished version left moved aside is put back,
        or removed when its successor is in place. Only the holder of the run's lock may: readers never rename."""
        if not self.holds_lock(to_write=True):
            raise RuntimeError(f"finishing a swap in {self.path} needs the run's lock")
        final, aside = self.folder(stage), self.aside_folder(stage)
        if self._complete_partial(stage):
            log.info("%s: swapping in the complete build a killed command left in %s", stage, final.name + PARTIAL)
            self.swap_in(stage)
        elif aside.exists() or aside.is_symlink():
            if final.exists() or final.is_symlink():
                remove_folder(aside)
            else:
                os.replace(aside, final)

    def _complete_partial(self, stage: str) -> bool:
        """Whether STAGE.partial/ holds a complete build whose files match its manifest (sizes and hashes)."""
        partial = self.partial_folder(stage)
        if not (partial / MANIFEST).is_file():
            return False
        try:
            manifest = self.read(stage, partial)
            if manifest is None or not manifest.complete:
                return False
            self.check_files(stage, manifest, folder=partial)
        except UsageError as err:
            log.warning("%s: %s is not swapped in (%s)", stage, partial, err)
            return False
        return True

    def swap_in(self, stage: str) -> None:
        """Replace STAGE/ by the complete STAGE.partial/ (lock holder only): the finished version is moved aside,
        the new one renamed into place, then the old one removed. A kill between any two steps leaves a state
        that ``finish_interrupted`` completes."""
        final, partial, aside = self.folder(stage), self.partial_folder(stage), self.aside_folder(stage)
        remove_folder(partial / "checkpoints")  # kept until the build was complete: a kill before resumes from them
        if final.exists() or final.is_symlink():
            remove_folder(aside)
            os.replace(final, aside)
        os.replace(partial, final)
        remove_folder(aside)

    # locking ------------------------------------------------------------------------------------------------
    def holds_lock(self, to_write: bool = False) -> bool:
        """Whether this process holds the run's lock (``to_write``: as a command that may write)."""
        held = _HELD.get(self.path.resolve())
        return held is not None and not (to_write and held[1])

    @contextlib.contextmanager
    def lock(self, command: str, read_only: bool = False, settle: bool = True) -> Iterator[None]:
        """Hold the run directory for one command; a second command is refused, naming the holder. Re-entrant
        within a process. A writing holder first finishes every swap a killed command left half done (only it
        renames stage folders; ``settle``); a ``read_only`` holder (``mlpmem verify``) writes nothing."""
        from filelock import FileLock, Timeout

        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"run directory {self.path} is a file, not a folder")
        if self.holds_lock():
            held = _HELD[self.path.resolve()]
            held[0] += 1
            try:
                yield
            finally:
                held[0] -= 1
            return
        if read_only and self.path.is_dir() and not os.access(self.path, os.W_OK):
            yield  # a run this user may not write (another user's, a read-only copy): checked as any reader would
            return
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / LOCK, timeout=0)
            lock.acquire()
        except Timeout:
            holder = self.path / f"{LOCK}.holder.json"
            try:
                who = read_json(holder) if holder.is_file() else {}
            except (OSError, ValueError):
                who = {}
            raise UsageError(
                f"{self.path} is in use by `{who.get('command', 'another mlpmem command')}` "
                f"(pid {who.get('pid', '?')} on {who.get('host', '?')}, since {who.get('since', '?')}); "
                "wait for it or use another --run-dir"
            ) from None
        except PermissionError:
            raise UsageError(f"cannot write to run directory {self.path}: permission denied") from None
        except OSError as err:
            raise UsageError(f"cannot use run directory {self.path}: {os.strerror(err.errno or 0) or err}") from None
        key = self.path.resolve()
        _HELD[key] = [1, read_only]
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
            if settle and not read_only:
                self.settle()
            yield
        finally:
            del _HELD[key]
            (self.path / f"{LOCK}.holder.json").unlink(missing_ok=True)
            lock.release()
            if created and {p.name for p in self.path.iterdir()} <= {LOCK}:  # refused before writing: leave no trace
                (self.path / LOCK).unlink(missing_ok=True)
                self.path.rmdir()

    def settle(self) -> None:
        """Finish every stage's swap that a killed command left half done (the lock holder, once it has the lock)."""
        importlib.import_module(MANIFEST_MODULE)  # every stage's manifest class registered
        for stage in list(MANIFESTS):
            self.finish_interrupted(stage)


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write a manifest with its checksum (over its JSON without the checksum)."""
    data = manifest.model_dump(mode="json", exclude={"checksum"})
    manifest.checksum = data["checksum"] = checksum(data)
    atomic_write_json(path, data)


# resumable chunks -------------------------------------------------------------------------------------------
def chunk_digest(rows: Sequence[np.ndarray]) -> str:
    """sha256 (16 hex digits) of a chunk's rows: each array's bytes in turn."""
    h = hashlib.sha256()
    for a in rows:
        h.update(np.ascontiguousarray(a))
    return h.hexdigest()[:16]


def read_progress(path: Path) -> dict[int, str]:
    """The chunks a progress file records as done, with their digests. A chunk listed without its digest (an
    edited file, or one written before digests) and an unreadable file count as nothing done."""
    if not Path(path).is_file():
        return {}
    try:
        digests = read_json(path).get("digests", {})
        return {int(c): str(d) for c, d in digests.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        log.warning("%s is unreadable: its chunks are computed again", path)
        return {}


def write_progress(path: Path, done: dict[int, str]) -> None:
    atomic_write_json(path, {"done": sorted(done), "digests": {str(c): done[c] for c in sorted(done)}})


def verified_chunks(recorded: dict[int, str], rows: Callable[[int], Sequence[np.ndarray]]) -> dict[int, str]:
    """The recorded chunks whose rows still hash to their digest; the others are logged and computed again."""
    done = {}
    for c, digest in sorted(recorded.items()):
        if chunk_digest(rows(c)) == digest:
            done[c] = digest
        else:
            log.warning("chunk %d does not match the digest recorded when it was written: computing it again", c)
    return done


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
        check_inside(self.dir, path, f"remove {self.dir} to start the stage afresh")
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
        write_manifest(self.dir / MANIFEST, self.manifest)

    def complete(self, **fields: Any) -> Manifest:
        """Record file hashes, mark complete, and swap the build into place (under the run's lock); returns the
        final manifest."""
        for name, value in fields.items():
            setattr(self.manifest, name, value)
        now = time.time()
        timings = {**self.manifest.timings, "seconds": round(now - self.started, 2), "completed_at": round(now, 3)}
        if "first_started_at" in timings:  # seconds: this attempt's; since_first_start: the wall time of every attempt
            timings["since_first_start"] = round(now - timings["first_started_at"], 2)
        self.manifest.timings = timings
        (self.dir / PROGRESS).unlink(missing_ok=True)
        remove_temp_files(self.dir)
        self.manifest.files = {str(p.relative_to(self.dir)): FileRecord.of(p) for p in content_files(self.dir)}
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
        if self.dir == self.run.folder(self.stage):
            remove_folder(self.dir / "checkpoints")
        else:
            with self.run.lock(f"mlpmem {self.stage}", settle=False):
                self.run.swap_in(self.stage)
            self.dir = self.run.folder(self.stage)
        return self.manifest

    # chunk-granular resume ----------------------------------------------------------------------------------
    def done_chunks(self, rows: Callable[[int], Sequence[np.ndarray]]) -> dict[int, str]:
        """The chunks recorded done (chunk -> digest) whose rows ``rows(c)`` still hash to the digest recorded
        when they were written. A chunk damaged since, or listed without its digest, is computed again. A resume
        reads what was written once."""
        return verified_chunks(read_progress(self.dir / PROGRESS), rows)

    def mark_chunk(self, index: int, done: dict[int, str], rows: Sequence[np.ndarray]) -> None:
        """Record chunk ``index`` as written (after its rows were flushed), with the digest of its rows."""
        done[index] = chunk_digest(rows)
        write_progress(self.dir / PROGRESS, done)
