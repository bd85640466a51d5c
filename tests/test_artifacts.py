"""Artifacts: atomic writes, stage identity (skip / resume / fresh), fingerprints."""

import os
import stat

from mlpmem.artifacts import Stage, atomic_write_json, fingerprint_path, read_json


def test_atomic_write_leaves_no_temp_file_and_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_stage_skips_complete_resumes_running_and_restarts_on_changed_inputs(tmp_path):
    stage = Stage(tmp_path, "s")
    assert stage.begin({"a": 1}, {"up": "x"}) == "fresh"
    arr = stage.add_array("v", "int32", (4,))
    arr[:] = [1, 2, 3, 4]
    arr.flush()
    assert Stage(tmp_path, "s").begin({"a": 1}, {"up": "x"}) == "resume"
    stage.complete({"n": 4})
    assert Stage(tmp_path, "s").begin({"a": 1}, {"up": "x"}) == "complete"
    assert Stage(tmp_path, "s").begin({"a": 1}, {"up": "changed"}) == "fresh"
    assert not (tmp_path / "s" / "v.bin").exists()  # stale outputs removed


def test_directory_fingerprint_follows_content_not_checkpoints(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"abc")
    before = fingerprint_path(tmp_path / "m")
    (tmp_path / "m" / "checkpoints").mkdir()
    (tmp_path / "m" / "checkpoints" / "x").write_bytes(b"zzz")
    assert fingerprint_path(tmp_path / "m") == before
    (tmp_path / "m" / "w.bin").write_bytes(b"abd")
    assert fingerprint_path(tmp_path / "m") != before
