"""Checkpoints: a resumable round trip, and hostile or damaged checkpoint files refused in one line."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

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
