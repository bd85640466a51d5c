"""What `mlpmem export` prints: an edge λ is named with what it means for the exported model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlpmem.export.run import Exported, print_export


@pytest.mark.parametrize(
    "lmbda,knn_lmbda,expected",
    [(1.0, 0.0, "leaves the base LM out"), (0.6, 0.4, "leaves the base LM out"), (0.0, 0.0, "never uses its memory")],
)
def test_an_edge_lambda_is_warned_about(caplog, lmbda, knn_lmbda, expected):
    with caplog.at_level(logging.WARNING, logger="mlpmem.export.run"):
        print_export(Exported(Path("out"), lmbda, "tuned on valid by mlpmem evaluate", knn_lmbda, {}))
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and expected in caplog.records[0].getMessage()


def test_an_inner_lambda_prints_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mlpmem.export.run"):
        print_export(Exported(Path("out"), 0.4, "set with --lmbda", 0.25, {}))
    assert not caplog.records
