"""Run directories: atomic writes, stage identity (reuse / resume / fresh), safe swaps, and every corruption,
concurrency and disk-full case of the fault campaign ending in one line instead of a wrong result."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlpmem import artifacts
from mlpmem.artifacts import (
    RunDir,
    StageBuild,
    atomic_write_json,
    fingerprint_obj,
    fingerprint_path,
    read_json,
    remove_folder,
)
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


def rebuild_killed_before_its_swap(run: RunDir, monkeypatch) -> None:
    """Build a 5-entry datastore (stride 3) over the 10-entry one, killed once its complete manifest is written in
    datastore.partial/ (the state a kill before the swap leaves)."""

    def killed(self, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        build_datastore_stage(run, np.arange(5, dtype=np.int32), stride=3)
    monkeypatch.undo()


def folders(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.path.iterdir() if not p.name.startswith(".lock"))


@pytest.mark.parametrize("kill", ["before_the_swap", "after_moving_aside", "after_renaming", "first_build"])
def test_a_build_killed_after_its_complete_manifest_is_swapped_in_not_rebuilt(run, monkeypatch, kill):
    """Each kill point of the swap (a complete manifest in STAGE.partial/, the finished version moved aside, the
    new one renamed in): the next command swaps the complete build in; nothing is built again."""
    if kill == "first_build":  # no finished version yet
        remove_folder(run.folder("datastore"))
    rebuild_killed_before_its_swap(run, monkeypatch)
    final, partial, aside = run.folder("datastore"), run.partial_folder("datastore"), run.aside_folder("datastore")
    assert (partial / "manifest.json").is_file() and read_json(partial / "manifest.json")["status"] == "complete"
    if kill in ("after_moving_aside", "after_renaming"):
        os.replace(final, aside)
    if kill == "after_renaming":
        os.replace(partial, final)
    built = []
    monkeypatch.setattr(StageBuild, "add_array", lambda *a: built.append(a))
    build = run.begin("datastore", DatastoreConfig(stride=3), {})
    assert build.status == "complete" and build.dir == final and not built
    assert run.require("datastore").entries == 5 and np.array_equal(run.array("datastore", "values"), np.arange(5))
    assert folders(run) == ["datastore"]


def test_a_complete_partial_build_is_swapped_in_by_whichever_command_takes_the_lock(run, monkeypatch):
    rebuild_killed_before_its_swap(run, monkeypatch)
    assert run.require("datastore").entries == 10  # readers see the finished version until then
    with run.lock("mlpmem index"):
        assert run.require("datastore").entries == 5
    assert folders(run) == ["datastore"]


def test_readers_never_finish_a_swap(run, monkeypatch, capsys):
    """Killed between the swap's two renames: a reader (generate, verify) waits a moment, then says what finishes
    it, renaming nothing; the next command holding the lock finishes it."""
    monkeypatch.setattr(artifacts, "SWAP_WAIT_SECONDS", 0.05)
    rebuild_killed_before_its_swap(run, monkeypatch)
    os.replace(run.folder("datastore"), run.aside_folder("datastore"))
    before = folders(run)
    with pytest.raises(UsageError, match=r"replacing it was interrupted.*run `mlpmem datastore --run-dir") as err:
        run.require("datastore")
    assert "\n" not in str(err.value)
    problems = verify(run.path)
    assert len(problems) == 1 and "interrupted" in problems[0]
    assert folders(run) == before and run.aside_folder("datastore").exists()
    with run.lock("mlpmem datastore"):
        assert run.require("datastore").entries == 5
    assert folders(run) == ["datastore"]


def test_a_reader_started_during_a_swap_gets_the_new_version_and_the_builder_finishes(run, monkeypatch, tmp_path):
    """The swap of a live builder (it holds the lock) is waited for by a lock-free reader in another process,
    which never renames: the builder's second rename succeeds and the reader reads the new version."""
    rebuild_killed_before_its_swap(run, monkeypatch)
    with run.lock("mlpmem datastore"):  # taking the lock would finish the swap: undo it to stand mid-swap
        final, partial, aside = run.folder("datastore"), run.partial_folder("datastore"), run.aside_folder("datastore")
        os.replace(final, partial)
        build_datastore_stage(RunDir(tmp_path / "scratch"), np.arange(10, dtype=np.int32))
        os.replace(tmp_path / "scratch" / "datastore", aside)  # the finished version moved aside, as a swap does
        reader = _python(f"""
            from mlpmem import artifacts
            artifacts.SWAP_WAIT_SECONDS = 120
            print("reading", flush=True)
            print(artifacts.RunDir({str(run.path)!r}).require("datastore").entries)
        """)
        assert reader.stdout.readline().strip() == "reading"
        time.sleep(0.5)  # lets the reader meet the swap midway (the result is the same if it comes later)
        os.replace(partial, final)  # the builder's second rename: the reader renamed nothing under it
        remove_folder(aside)
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert out.strip() == "5"


def test_verify_is_refused_while_a_command_holds_the_run(run, tmp_path):
    holder = _python(f"""
        import time
        from mlpmem.artifacts import RunDir
        with RunDir({str(run.path)!r}).lock("mlpmem datastore"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=r"in use by `mlpmem datastore`"):
            verify(run.path)
    finally:
        holder.kill()
        holder.wait()
    assert verify(run.path) == []


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


def flip_byte(path: Path, offset: int = 7) -> None:
    """Corrupt one byte in place and move the file's modification time (a write the kernel may stamp with the
    same coarse clock tick as the stage's completion: set it apart, as any later write would be)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Every file hashed from now on (and every file counts as large: none is hashed for being small)."""
    monkeypatch.setattr(artifacts, "SMALL_FILE_BYTES", 0)
    names, real = [], artifacts.file_sha256

    def spy(path):
        names.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(artifacts, "file_sha256", spy)
    artifacts._HASHES.clear()
    return names


def test_reads_trust_unchanged_large_files_and_verify_hashes_every_file(run, hashed, capsys):
    run.require("datastore")
    assert hashed == []  # a 14 GB LM is not reread by every command
    assert verify(run.path) == []
    assert sorted(hashed) == ["keys.bin", "notes.txt", "values.bin"]


def test_a_large_file_written_since_completion_is_rehashed_and_refused(run, hashed, capsys):
    flip_byte(run.folder("datastore") / "keys.bin")
    with pytest.raises(UsageError, match=r"keys.bin does not match its recorded content hash.*remove .*datastore"):
        run.require("datastore")
    assert hashed == ["keys.bin"]
    problems = verify(run.path)
    assert len(problems) == 1 and "keys.bin does not match its recorded content hash" in problems[0]


def test_a_copied_run_is_rehashed_once_then_trusted_again(run, hashed, tmp_path):
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.path, copy.path, symlinks=True)  # new inodes: every file is rehashed
    manifest_time = (copy.folder("datastore") / "manifest.json").stat().st_mtime_ns
    copy.require("datastore")
    copy.require("datastore")
    assert sorted(hashed) == ["keys.bin"] * 2 + ["notes.txt"] * 2 + ["values.bin"] * 2  # a reader records nothing
    hashed.clear()
    with copy.lock("mlpmem index"):
        copy.require("datastore")  # the lock holder re-records the identities it found intact
    assert sorted(hashed) == ["keys.bin", "notes.txt", "values.bin"]
    hashed.clear()
    assert copy.require("datastore").entries == 10 and hashed == []
    assert (copy.folder("datastore") / "manifest.json").stat().st_mtime_ns == manifest_time


def test_a_corrupted_upstream_array_is_refused_by_every_later_command(tiny_run, monkeypatch, capsys):
    """prepare/train.bin corrupted (and so touched) after the run completed: the next command refuses it in one
    line, naming what works (a rerun alone would reuse it again)."""
    from mlpmem.cli import main

    monkeypatch.setattr(artifacts, "SMALL_FILE_BYTES", 0)
    flip_byte(tiny_run / "prepare" / "train.bin")
    assert main(["datastore", "--run-dir", str(tiny_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.bin does not match its recorded content hash" in err
    assert f"remove {tiny_run / 'prepare'} and rerun `mlpmem prepare --run-dir {tiny_run}`" in err
    assert not (tiny_run / "datastore.partial").exists()


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


def test_a_file_linked_out_of_its_stage_is_refused(run, tmp_path, capsys):
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(run.folder("datastore") / "values.bin", outside)
    (run.folder("datastore") / "values.bin").unlink()
    os.symlink(outside, run.folder("datastore") / "values.bin")
    with pytest.raises(UsageError, match=r"values.bin is a link to .*elsewhere.bin, outside .*refusing") as err:
        run.require("datastore")
    assert "\n" not in str(err.value)
    assert "values.bin is a link" in " ".join(verify(run.path))


def test_a_resume_never_writes_through_a_link_out_of_the_partial_build(run, tmp_path):
    build = run.begin("datastore", DatastoreConfig(stride=3), {})
    build.add_array("values", "int32", (5,))
    outside = tmp_path / "victim.bin"
    outside.write_bytes(b"precious")
    (build.dir / "values.bin").unlink()
    os.symlink(outside, build.dir / "values.bin")  # killed, and the partial file replaced by a link
    with pytest.raises(UsageError, match=r"is a link to .*victim.bin.*remove .*datastore.partial to start"):
        build = run.begin("datastore", DatastoreConfig(stride=3), {})
        build.add_array("values", "int32", (5,))
    assert outside.read_bytes() == b"precious"


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
