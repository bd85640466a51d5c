"""Progress bars with rates on a terminal, and plain periodic lines when the output is a log file or a pipe.

for x in progress(items, desc="datastore", unit="tok"): ...
with progress(total=n, desc="targets", unit="q") as bar: bar.update(k)
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # seconds between plain lines when stderr is not a terminal


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


def is_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, ``LogLines`` elsewhere; same arguments as tqdm."""
    if is_terminal():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("ncols", 100)
    return LogLines(iterable, **kwargs)
