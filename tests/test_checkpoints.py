"""Checkpoints: a resumable round trip, and hostile, damaged or half-written checkpoint files refused in one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlpmem.artifacts import file_sha256
from mlpmem.checkpoints import load_checkpoint, save_checkpoint
from mlpmem.errors import UsageError

from conftest import tiny_gpt2


class Exploit:
    """Unpickling this runs a shell command: what a malicious state.pt would hold."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_round_trip_restores_weights_state_and_rng(tmp_path):
    model = tiny_gpt2()
    torch.manual_seed(3)
    save_checkpoint(tmp_path, 7, model, {"note": torch.tensor([1.5])})
    expected = torch.rand(3)
    other = tiny_gpt2(seed=1)
    state = load_checkpoint(tmp_path, other)
    assert state["step"] == 7 and float(state["note"]) == 1.5
    assert torch.equal(torch.rand(3), expected)  # the RNG continues where the checkpoint left it
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("payload", ["exploit", "plain_object"])
def test_a_hostile_state_file_is_refused_without_running_it(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path, 1, tiny_gpt2(), {})
    state = tmp_path / "checkpoints" / "step-1" / "state.pt"
    obj = Exploit() if payload == "exploit" else {"step": 1, "rng": {}, "x": tmp_path}
    torch.save(obj, state, pickle_module=pickle)
    rerecord_hashes(tmp_path)  # the hashes are unkeyed: whoever planted the file can record its hash too
    with pytest.raises(UsageError, match="refusing to resume") as err:
        load_checkpoint(tmp_path, tiny_gpt2())
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    save_checkpoint(tmp_path, 1, tiny_gpt2(), {})
    weights = tmp_path / "checkpoints" / "step-1" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UsageError, match="damaged"):
        load_checkpoint(tmp_path, tiny_gpt2())


def rerecord_hashes(stage_dir: Path) -> None:
    """Record the checkpoint's files as they now are in latest.json."""
    pointer = stage_dir / "checkpoints" / "latest.json"
    latest = json.loads(pointer.read_text())
    folder = pointer.parent / latest["folder"]
    latest["files"] = {name: file_sha256(folder / name) for name in latest["files"]}
    pointer.write_text(json.dumps(latest))


def test_a_checkpoint_changed_since_it_was_written_is_refused_and_the_hint_works(tmp_path):
    """A flipped byte in the weights (still a valid safetensors file, so it would load): refused; removing the
    checkpoints folder, as the line says, restarts from step 0."""
    save_checkpoint(tmp_path, 1, tiny_gpt2(), {})
    weights = tmp_path / "checkpoints" / "step-1" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data
    weights.write_bytes(bytes(data))
    assert load_file(weights)  # loadable: only the hash tells
    with pytest.raises(UsageError, match=r"damaged \(model/model.safetensors .*remove .*checkpoints to restart") as err:
        load_checkpoint(tmp_path, tiny_gpt2())
    assert "\n" not in str(err.value)
    hint = str(err.value).split("remove ")[1].split(" to restart")[0]
    shutil.rmtree(hint)
    assert load_checkpoint(tmp_path, tiny_gpt2()) is None


def test_a_checkpoint_missing_a_tensor_is_refused_even_with_matching_hashes(tmp_path):
    save_checkpoint(tmp_path, 1, tiny_gpt2(), {})
    weights = tmp_path / "checkpoints" / "step-1" / "model" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    rerecord_hashes(tmp_path)
    with pytest.raises(UsageError, match=r"does not fit the model \(1 tensors missing, 0 unexpected: transformer.h.1"):
        load_checkpoint(tmp_path, tiny_gpt2())


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 11904 vs 11792"),
        OSError(28, "No space left on device"),
    ],
    ids=["torch_zip_writer", "enospc"],
)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, error):
    """torch's zip writer reports a short write as 'unexpected pos': a full disk like any other."""
    model = tiny_gpt2()
    save_checkpoint(tmp_path, 1, model, {"note": torch.tensor([1.0])})
    real_save = torch.save

    def fill_the_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(100)  # what a full disk leaves
        raise error

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(UsageError, match=r"^no space left writing .*step-2.*free space and rerun to resume") as err:
        save_checkpoint(tmp_path, 2, model, {"note": torch.tensor([2.0])})
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-1"]
    assert float(load_checkpoint(tmp_path, tiny_gpt2(seed=1))["note"]) == 1.0
