"""check_token_ids against a plain loop over the ids, for numpy blocks and tensors, with and without padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmem.data.tokens import check_token_ids, source_of
from mlpmem.errors import UsageError


def naive_first_bad(ids, vocab_size: int, lowest: int) -> int | None:
    """The id a refusal should name: the largest when some id is too large, else the smallest (loop, no numpy)."""
    flat = [int(i) for i in np.asarray(ids).ravel()]
    if any(i >= vocab_size for i in flat):
        return max(flat)
    if any(i < lowest for i in flat):
        return min(flat)
    return None


@pytest.mark.parametrize("lowest", [0, -1])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_refuses_exactly_the_blocks_a_loop_finds_out_of_range(lowest, as_tensor):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        block = rng.integers(-3, 53, size=tuple(rng.integers(0, 6, size=2)))  # some empty, some with -3..52
        block = torch.from_numpy(block) if as_tensor else block
        bad = naive_first_bad(block, 50, lowest)
        seen.add(bad is None)
        if bad is None:
            check_token_ids(block, 50, "runs/x/prepare/train.bin", lowest=lowest)
            continue
        with pytest.raises(UsageError) as err:
            check_token_ids(block, 50, "runs/x/prepare/train.bin", lowest=lowest)
        assert err.value.for_cli() == (
            f"runs/x/prepare/train.bin holds token id {bad}, outside the vocabulary [0, 50) (corrupted or replaced); "
            "remove runs/x/prepare and rerun `mlpmem prepare`"
        )
    assert seen == {True, False}


def test_a_block_read_from_no_file_and_an_unknown_vocabulary():
    with pytest.raises(UsageError, match=r"^token id 60 lies outside the model's vocabulary \[0, 50\)$"):
        check_token_ids(np.array([1, 60]), 50)
    check_token_ids(np.array([10**9]), None)  # no vocabulary recorded: nothing to check against


def test_source_of_names_a_memmap_and_its_slices(tmp_path):
    path = tmp_path / "valid.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    assert source_of(tokens) == source_of(tokens[2:5]) == Path(path)
    assert source_of(np.asarray(tokens)) is None
