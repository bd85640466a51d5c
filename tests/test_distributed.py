"""Multi-process stages: the launch check, the shares of work, and (slow) the heavy stages under a real
``accelerate launch`` of 2 CPU processes (gloo) against one process: the same bytes, or the same loss and PPL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.distributed import check_launch, contiguous_share
from mlpmem.errors import UsageError

from conftest import make_tiny_run

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 5), (3, 4)])
def test_contiguous_shares_cover_everything_once_in_order(n, world):
    blocks = [contiguous_share(n, r, world) for r in range(world)]
    assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
    assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_single_process_launch_asked_for_several_is_refused(monkeypatch):
    """accelerate's single-process launcher (ACCELERATE_USE_CPU, no WORLD_SIZE) with a rendezvous address: N > 1
    was asked for and one process started."""
    for name in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    check_launch()  # no launcher
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    check_launch()  # accelerate launch of one process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UsageError, match="started one process") as err:
        check_launch()
    assert "\n" not in str(err.value) and "--multi_gpu" in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch
    check_launch()


# the heavy stages under a real launch (slow) --------------------------------------------------------------------
PIPELINE = {
    "prepare": {"train_tokenizer": 288},  # not run: the tiny run's tokens are synthetic
    "datastore": {"chunk_windows": 5, "batch_size": 4, "device": "cpu"},
    "index": {"factory": "IVF16,PQ8", "nprobe": 4, "add_chunk": 700},
    "targets": {"k": 8, "width": 8, "knn_temperature": 5.0, "chunk_size": 500},
    "train_memory": {
        "n_blocks": 1,
        "epochs": 1.0,
        "batch_size": 64,
        "valid_size": 256,
        "eval_interval": 20,
        "dtype": "float32",
        "device": "cpu",
    },
    "evaluate": {"k": 8, "knn_temperatures": [2.0, 5.0], "lmbdas": [0.1, 0.25, 0.5], "device": "cpu"},
}
STAGES = ["datastore", "index", "targets", "train-memory", "evaluate"]


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "-m", "mlpmem.cli", *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny pipeline run by one process (in this one) and by 2 launched CPU processes."""
    folder = tmp_path_factory.mktemp("mp")
    one, two = make_tiny_run(folder / "one"), make_tiny_run(folder / "two")
    for run in (one, two):
        (run.parent / f"{run.name}.yaml").write_text(yaml.safe_dump({"run_dir": str(run), **PIPELINE}))
    torch.set_num_threads(1)
    assert main(["-q", "run", str(folder / "one.yaml"), "--stages", *STAGES]) == 0
    out = launch(["-q", "run", str(folder / "two.yaml"), "--stages", *STAGES])
    assert out.returncode == 0, out.stderr[-3000:]
    return RunDir(one), RunDir(two)


@pytest.mark.slow
def test_every_stage_records_its_processes(runs):
    one, two = runs
    for stage in STAGES:
        assert one.require(stage).environment.processes == 1
        assert two.require(stage).environment.processes == 2, stage


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,files", [("datastore", ["keys.bin", "values.bin"]), ("index", ["index.faiss"]), ("targets", None)]
)
def test_two_processes_write_the_same_bytes(runs, stage, files):
    one, two = runs
    files = files or [spec.file for spec in one.require(stage).arrays.values()]
    for name in files:
        assert (one.folder(stage) / name).read_bytes() == (two.folder(stage) / name).read_bytes(), name
    assert not list(two.folder(stage).glob("*.rank*")) and not list(two.folder(stage).glob("*.tmp"))


@pytest.mark.slow
def test_two_processes_train_the_same_memory(runs):
    """Each rank half of every global batch, gradients averaged: the same weights and losses within float
    tolerance (sums in another order)."""
    one, two = runs
    a, b = one.require("train-memory"), two.require("train-memory")
    assert a.steps == b.steps and a.steps > 20
    for key in ("loss", "kl", "ce"):
        assert b.valid[key] == pytest.approx(a.valid[key], rel=1e-4)
    wa = load_file(one.folder("train-memory") / "model" / "model.safetensors")
    wb = load_file(two.folder("train-memory") / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_evaluate_the_same_perplexities(runs):
    one, two = runs
    a, b = one.require("evaluate"), two.require("evaluate")
    assert a.tokens == b.tokens
    for sa, sb in zip(a.systems, b.systems, strict=True):
        assert (sa.name, sa.lmbda, sa.temperature) == (sb.name, sb.lmbda, sb.temperature)
        assert sb.valid_ppl == pytest.approx(sa.valid_ppl, rel=1e-5)
        assert sb.test_ppl == pytest.approx(sa.test_ppl, rel=1e-5)
    assert np.isfinite([s.test_ppl for s in b.systems]).all()


@pytest.mark.slow
def test_accelerate_cpu_launch_of_two_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: refused in one line, nothing built."""
    run = make_tiny_run(tmp_path / "run")
    accelerate = Path(sys.executable).with_name("accelerate")
    out = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "2", "-m", "mlpmem.cli", "datastore"]
        + ["--run-dir", str(run)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("mlpmem: error:")]
    assert out.returncode != 0 and len(errors) == 1 and "started one process where 2 were asked for" in errors[0]
    assert not (run / "datastore").exists() and not (run / "datastore.partial").exists()


LIGHT = {
    **PIPELINE,
    "datastore": {**PIPELINE["datastore"], "keys": "streamed"},
    "index": {**PIPELINE["index"], "add_chunk": 300},  # several chunks of whole windows: each rank streams its own
    "targets": {**PIPELINE["targets"], "store": False},
    "train_memory": {**PIPELINE["train_memory"], "mode": "online"},
    "evaluate": {**PIPELINE["evaluate"], "knn": False},
}


@pytest.mark.slow
def test_a_disk_light_run_by_two_processes_equals_one(tmp_path):
    """Keys streamed into the index (each rank recomputing its share), targets searched per batch, online keys: the
    same index bytes, the same memory within float tolerance; the launch prints its run summary once."""
    one, two = make_tiny_run(tmp_path / "one"), make_tiny_run(tmp_path / "two")
    for run in (one, two):
        (tmp_path / f"{run.name}.yaml").write_text(yaml.safe_dump({"run_dir": str(run), **LIGHT}))
    torch.set_num_threads(1)
    assert main(["-q", "run", str(tmp_path / "one.yaml"), "--stages", *STAGES]) == 0
    out = launch(["run", str(tmp_path / "two.yaml"), "--stages", *STAGES])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("built in") == 1, out.stdout
    a, b = RunDir(one), RunDir(two)
    assert (a.folder("index") / "index.faiss").read_bytes() == (b.folder("index") / "index.faiss").read_bytes()
    assert b.require("train-memory").environment.processes == 2
    wa = load_file(a.folder("train-memory") / "model" / "model.safetensors")
    wb = load_file(b.folder("train-memory") / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    for sa, sb in zip(a.require("evaluate").systems, b.require("evaluate").systems, strict=True):
        assert sb.test_ppl == pytest.approx(sa.test_ppl, rel=1e-5)
