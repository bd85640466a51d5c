"""Progress bars with rates on a terminal, plain periodic lines when the output is a log file or a pipe, and the
log set-up behind the CLI's ``--quiet`` / ``--log-level``.

for x in progress(items, desc="datastore", unit="tok"): ...
with progress(total=n, desc="targets", unit="q") as bar: bar.update(k)
configure_output(level="warning", quiet=True)   # mlpmem -q ...: no progress, warnings and errors only
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # seconds between plain lines when stderr is not a terminal
LOG_LEVELS = ("debug", "info", "warning", "error")
_QUIET = False  # set by configure_output: every progress bar disabled


class LogLines(tqdm):
    """A tqdm that writes one plain line per update interval (no carriage returns): readable in ``make demo > log``."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = (msg if msg is not None else self.__str__()).strip()
        if text:
            self.fp.write(text + "\n")
            self.fp.flush()
        return True

    def __del__(self) -> None:
        self.disable = True  # a bar left open by an error prints nothing when it is collected later
        super().__del__()


class BarSafeHandler(logging.StreamHandler):
    """On a terminal, log lines written through tqdm, so they appear above a progress bar instead of through it;
    elsewhere plain lines (no carriage returns). Always the current ``sys.stderr`` (it may be replaced)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler sets it; the current stderr is used instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not is_terminal(self.stream):
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def main_process() -> bool:
    """Whether this is the main process of a launch (rank 0; True without a launcher). Read from the launcher's
    environment, so that it costs no torch import."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def configure_output(level: str = "info", quiet: bool = False) -> None:
    """Log level of every logger (lines on stderr, message only) and whether progress output is shown. The other
    processes of a launch show warnings and errors only: the main process speaks for the launch."""
    global _QUIET
    if not main_process():
        level, quiet = ("warning" if logging.getLevelName(level.upper()) < logging.WARNING else level), True
    _QUIET = quiet
    logging.basicConfig(level=level.upper(), format="%(message)s", handlers=[BarSafeHandler()], force=True)
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.getLogger().level))


def is_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, ``LogLines`` elsewhere, nothing when quiet; same arguments as tqdm."""
    kwargs["disable"] = kwargs.get("disable", False) or _QUIET
    if is_terminal():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("ncols", 100)
    return LogLines(iterable, **kwargs)
