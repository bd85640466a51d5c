"""A hub model's identity is its id and the commit hash it resolves to, read from the local HF cache offline."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from mlpmem.lm.load import hub_revision, model_fingerprint


def cache_snapshot(cache, repo: str, commit: str) -> None:
    """The layout huggingface_hub writes: refs/main names the snapshot folder of the default branch."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: the cache alone answers
    return tmp_path / "hub"


def test_the_fingerprint_changes_with_the_cached_revision(hub_cache):
    cache_snapshot(hub_cache, "org/tiny", "1" * 40)
    assert hub_revision("org/tiny") == "1" * 40
    first = model_fingerprint("org/tiny")
    assert model_fingerprint("org/tiny") == first  # stable while the revision stays
    cache_snapshot(hub_cache, "org/tiny", "2" * 40)  # the default branch moved to a new commit
    assert hub_revision("org/tiny") == "2" * 40 and model_fingerprint("org/tiny") != first


def test_an_unknown_revision_is_none_offline(hub_cache):
    assert hub_revision("org/never-downloaded") is None
    assert model_fingerprint("org/never-downloaded") != model_fingerprint("org/other")
