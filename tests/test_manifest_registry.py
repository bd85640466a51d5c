"""Stage manifests register themselves under their stage name, so ``RunDir`` reads a stage through its manifest
class (or that name) without the stage table."""

from __future__ import annotations

import subprocess
import sys

from mlpmem.artifacts import MANIFESTS, RunDir
from mlpmem.manifests import PrepareManifest, TrainLMManifest
from mlpmem.stages import STAGES

from conftest import make_tiny_run


def test_every_building_stage_has_its_manifest_registered_under_its_name():
    building = {spec.name: spec.manifest for spec in STAGES if spec.builds}
    assert building == MANIFESTS
    assert all(cls.STAGE == name for name, cls in building.items())


def test_require_by_class_is_require_by_name(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run"))
    assert run.require(TrainLMManifest) == run.require("train-lm")
    assert run.complete(PrepareManifest).fingerprint == run.read("prepare").fingerprint
    assert run.read(TrainLMManifest).config.run_dir == run.path


def test_a_name_is_found_without_importing_the_manifests_first(tmp_path):
    """Reading by name in a fresh process that imported only ``mlpmem.artifacts``."""
    make_tiny_run(tmp_path / "run")
    run = str(tmp_path / "run")
    code = f"from mlpmem.artifacts import RunDir; print(type(RunDir({run!r}).require('prepare')).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PrepareManifest"
