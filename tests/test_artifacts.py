"""Run directories: atomic writes, stage identity (reuse / resume / fresh), safe swaps, and every corruption,
concurrency and disk-full case of the fault campaign ending in one line instead of a wrong result."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlpmem.artifacts import RunDir, atomic_write_json, fingerprint_obj, fingerprint_path, read_json
from mlpmem.config import DatastoreConfig, IndexConfig
from mlpmem.errors import UsageError
from mlpmem.summary import verify


def build_datastore_stage(run: RunDir, values: np.ndarray, **config) -> None:
    """A complete 'datastore' stage through the real API: keys [N, 4] float32 = the values repeated."""
    build = run.begin("datastore", DatastoreConfig(**config), {})
    keys = build.add_array("keys", "float32", (len(values), 4))
    keys[:] = np.repeat(values[:, None], 4, axis=1)
    keys.flush()
    vals = build.add_array("values", "int32", (len(values),))
    vals[:] = values
    vals.flush()
    (build.dir / "notes.txt").write_text("a small non-array file: hashed on every read\n")
    build.complete(model_fingerprint="m", key_layer="layer", context=8, stride=4, windows=1)


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    build_datastore_stage(run, np.arange(10, dtype=np.int32))
    return run


def test_atomic_write_leaves_no_temp_file_and_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_reuse_resume_and_fresh_builds_beside_the_finished_stage(run):
    config = DatastoreConfig()
    assert run.begin("datastore", config, {}).status == "complete"
    assert (
        run.begin("datastore", config.model_copy(update={"device": "cpu", "batch_size": 99}), {}).status == "complete"
    )
    other = config.model_copy(update={"stride": 3})
    build = run.begin("datastore", other, {})
    assert build.status == "fresh" and build.dir == run.partial_folder("datastore")
    assert run.require("datastore").config.stride is None  # the finished version is untouched while building
    assert run.begin("datastore", other, {}).status == "resume"
    assert run.begin("datastore", config, {"up": "changed"}).status == "fresh"  # other inputs: a new build


def test_a_manifest_written_before_fields_were_added_is_read_and_reused(run):
    """A manifest from an earlier version lacks fields added since (with defaults): its checksum covers what it
    holds, so it is neither refused as edited nor rebuilt."""
    path = run.folder("datastore") / "manifest.json"
    data = read_json(path)
    del data["environment"]["threads"], data["config"]["threads"]  # as an earlier version wrote it
    data["checksum"] = fingerprint_obj({k: v for k, v in data.items() if k != "checksum"})
    path.write_text(json.dumps(data))
    manifest = run.require("datastore")
    assert manifest.environment.threads is None and manifest.config.threads is None
    assert run.begin("datastore", DatastoreConfig(threads=2), {}).status == "complete"


def test_a_failed_rebuild_keeps_the_finished_stage_and_a_successful_one_replaces_it(run):
    before = run.require("datastore").fingerprint
    build = run.begin("datastore", DatastoreConfig(stride=3), {})
    build.add_array("values", "int32", (3,))  # ... and the command fails here
    assert run.require("datastore").fingerprint == before
    build_datastore_stage(run, np.arange(5, dtype=np.int32), stride=3)
    after = run.require("datastore")
    assert after.fingerprint != before and after.entries == 5 and not run.partial_folder("datastore").exists()


def test_an_interrupted_swap_is_finished_on_the_next_read(run, tmp_path):
    final, old = run.folder("datastore"), run.path / ".datastore.old"
    os.replace(final, old)  # killed between the two renames of a swap: only the old version and no new one
    assert run.require("datastore").entries == 10 and not old.exists()


def test_stage_folders_from_manifests_never_leave_the_stage(run):
    path = run.folder("datastore") / "manifest.json"
    data = read_json(path)
    data["arrays"]["values"]["file"] = "../../../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="must stay inside"):
        run.require("datastore")
    with pytest.raises(UsageError, match="must stay inside"):
        run.file("datastore", "../prepare")


@pytest.mark.parametrize(
    "damage,message",
    [
        ("flip_notes", "does not match its recorded content hash"),
        ("truncate_values", "bytes, its manifest says"),
        ("edit_manifest_shape", "modified or damaged"),
        ("edit_manifest_status", "modified or damaged"),
        ("delete_manifest", "has no complete manifest"),
        ("garbage_manifest", "not a valid datastore manifest"),
    ],
)
def test_damaged_artifacts_are_refused_in_one_line(run, damage, message):
    folder = run.folder("datastore")
    if damage == "flip_notes":
        text = (folder / "notes.txt").read_bytes()
        (folder / "notes.txt").write_bytes(bytes([text[0] ^ 1]) + text[1:])
    elif damage == "truncate_values":
        with open(folder / "values.bin", "r+b") as fh:
            fh.truncate(12)
    elif damage.startswith("edit_manifest"):
        data = read_json(folder / "manifest.json")
        if damage.endswith("shape"):
            data["arrays"]["keys"]["shape"] = [10, 2]
        else:
            data["status"] = "running"
        (folder / "manifest.json").write_text(json.dumps(data))
    elif damage == "delete_manifest":
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match=message) as err:
        run.complete("datastore")
    assert "\n" not in str(err.value)


def test_verify_finds_a_flipped_byte_in_a_large_array_that_reads_only_check_by_size(run, capsys):
    assert verify(run.path) == []
    with open(run.folder("datastore") / "keys.bin", "r+b") as fh:
        fh.seek(7)
        byte = fh.read(1)
        fh.seek(7)
        fh.write(bytes([byte[0] ^ 0xFF]))
    run.require("datastore")  # reads check sizes and the hashes of small files only
    problems = verify(run.path)
    assert len(problems) == 1 and "keys.bin does not match its recorded content hash" in problems[0]


def test_a_stage_built_from_an_older_upstream_is_refused(run):
    ds = run.require("datastore")
    build = run.begin("index", IndexConfig(factory="Flat"), {"datastore": ds.fingerprint})
    (build.dir / "index.faiss").write_bytes(b"x")
    build.complete(factory="Flat", ntotal=10)
    assert run.require("index").factory == "Flat"
    build_datastore_stage(run, np.arange(7, dtype=np.int32), stride=2)  # the datastore is rebuilt
    with pytest.raises(UsageError, match="built from another version of datastore"):
        run.require("index")


def test_a_linked_stage_is_reused_but_never_rebuilt(run, tmp_path):
    other = RunDir(tmp_path / "ablation")
    other.path.mkdir()
    os.symlink(run.folder("datastore"), other.folder("datastore"))
    assert other.begin("datastore", DatastoreConfig(), {}).status == "complete"
    with pytest.raises(UsageError, match="is a link to .*refusing to rebuild"):
        other.begin("datastore", DatastoreConfig(stride=3), {})


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_a_second_command_on_a_run_in_use_is_refused_naming_the_holder(tmp_path):
    holder = _python(f"""
        import time
        from mlpmem.artifacts import RunDir
        with RunDir({str(tmp_path / "run")!r}).lock("mlpmem run configs/demo.yaml"):
            print("locked", flush=True)
            time.sleep(30)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"in use by `mlpmem run configs/demo.yaml` \(pid {holder.pid}"):
            with RunDir(tmp_path / "run").lock("mlpmem train-memory"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path / "run").lock("mlpmem evaluate"):  # free again once the holder is gone
        pass


def test_a_run_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        with RunDir(tmp_path / "f").lock("mlpmem prepare"):
            pass


def test_a_full_disk_is_one_line_and_leaves_nothing_complete(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse the write exactly as a full disk would."""
    proc = _python(f"""
        import resource, signal
        import numpy as np
        from mlpmem.artifacts import RunDir
        from mlpmem.config import DatastoreConfig
        from mlpmem.errors import UsageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        build = RunDir({str(tmp_path / "run")!r}).begin("datastore", DatastoreConfig(), {{}})
        try:
            build.add_array("keys", "float32", (1 << 20, 4))
        except UsageError as err:
            print(err)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("no space left writing") and "keys.bin" in out and out.count("\n") == 1
    assert not (tmp_path / "run" / "datastore").exists()


def test_directory_fingerprint_follows_content_not_checkpoints(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"abc")
    before = fingerprint_path(tmp_path / "m")
    (tmp_path / "m" / "checkpoints").mkdir()
    (tmp_path / "m" / "checkpoints" / "x").write_bytes(b"zzz")
    assert fingerprint_path(tmp_path / "m") == before
    time.sleep(0.01)
    (tmp_path / "m" / "w.bin").write_bytes(b"abd")
    assert fingerprint_path(tmp_path / "m") != before
