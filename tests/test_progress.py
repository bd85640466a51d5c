"""Progress output: plain periodic lines (no carriage returns) when stderr is not a terminal."""

from __future__ import annotations

import io
import logging

from mlpmem import progress as progress_module
from mlpmem.progress import LogLines, configure_output, progress


def test_log_lines_are_plain_lines_with_rates():
    out = io.StringIO()
    bar = LogLines(total=1000, desc="datastore", unit="tok", file=out, mininterval=0, miniters=1)
    for _ in range(10):
        bar.update(100)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = [line for line in text.splitlines() if line]
    assert len(lines) >= 2 and all(line.startswith("datastore") for line in lines)
    assert "1000/1000" in lines[-1] and "tok/s" in lines[-1]


def test_progress_picks_log_lines_when_not_a_terminal(capsys):
    bar = progress(total=3, desc="x")  # pytest's captured stderr is not a terminal
    assert isinstance(bar, LogLines)
    bar.close()


def test_log_lines_beside_a_progress_bar_have_no_carriage_returns(capsys):
    import logging

    from mlpmem.progress import configure_output

    configure_output("info")
    bar = progress(total=3, desc="x", mininterval=0, miniters=1)
    bar.update(1)
    logging.getLogger("mlpmem.test").info("step 1: valid loss 2.0")
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "step 1: valid loss 2.0\n" in err
    configure_output("warning", quiet=True)
    bar = progress(total=3, desc="quiet")
    bar.update(3)
    bar.close()
    logging.getLogger("mlpmem.test").info("hidden")
    assert capsys.readouterr().err == ""
    configure_output()


def test_only_the_main_process_of_a_launch_logs_info_and_shows_progress(monkeypatch):
    try:
        monkeypatch.setenv("RANK", "1")
        configure_output("info")
        assert logging.getLogger().level == logging.WARNING and progress_module._QUIET
        configure_output("error")
        assert logging.getLogger().level == logging.ERROR
        monkeypatch.setenv("RANK", "0")
        configure_output("info")
        assert logging.getLogger().level == logging.INFO and not progress_module._QUIET
    finally:
        monkeypatch.delenv("RANK")
        configure_output("info")
