"""The exported model card names the base LM as it is: the hub model and its revision, or the real architecture."""

from __future__ import annotations

import pytest

from mlpmem.artifacts import Environment
from mlpmem.config import TrainLMConfig
from mlpmem.export.card import base_model_line
from mlpmem.manifests import TrainLMManifest


def manifest(run_dir, **kw) -> TrainLMManifest:
    base_revision = kw.pop("base_revision", None)
    config = TrainLMConfig(run_dir=run_dir, n_layer=2, n_embd=64, n_head=2, **kw)
    return TrainLMManifest(
        stage="train-lm", config=config, environment=Environment.current(), steps=1200, base_revision=base_revision
    )


@pytest.mark.parametrize(
    "arch,name", [("gpt2", "GPT-2"), ("mom", "MoM (Mixture-of-Memories)"), ("gated-deltanet", "Gated DeltaNet")]
)
def test_a_from_scratch_lm_is_named_by_its_architecture(tmp_path, arch, name):
    line = base_model_line(manifest(tmp_path, arch=arch))
    assert line == f"{name} trained from scratch (2 layers, width 64, 1,200 steps)"


def test_a_continued_hub_model_is_named_with_its_revision(tmp_path):
    line = base_model_line(manifest(tmp_path, model="org/tiny", base_revision="a" * 40))
    assert line == f"`org/tiny` at revision `{'a' * 40}` continued for 1,200 steps"
    assert base_model_line(manifest(tmp_path, model="org/tiny")) == "`org/tiny` continued for 1,200 steps"
