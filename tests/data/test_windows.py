"""The sliding-window protocol: every position scored once, with enough history."""

import pytest

from mlpmem.data.windows import sliding_windows
from mlpmem.errors import UsageError


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (100, 16, 5), (17, 8, 7), (5, 8, 4), (64, 8, 1)])
def test_every_position_scored_once_with_history(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [p for w in windows for p in range(w.first_scored, w.end - 1)]
    assert scored == list(range(n - 1))
    for i, w in enumerate(windows):
        assert w.end - w.begin <= context
        if i > 0:  # past the first window every scored position sees >= context - stride tokens
            assert w.first_scored - w.begin + 1 >= context - stride


def test_stride_equal_to_context_gives_disjoint_windows():
    windows = sliding_windows(10, 4, 4)
    assert [(w.begin, w.end) for w in windows] == [(0, 4), (4, 8), (8, 10)]
    assert sum(w.n_scored for w in windows) == 3 + 3 + 1  # the HF loss of each window: len - 1 predictions


def test_bad_stride_is_a_usage_error():
    with pytest.raises(UsageError, match="stride") as err:
        sliding_windows(10, 4, 5)
    assert err.value.field == "stride"
