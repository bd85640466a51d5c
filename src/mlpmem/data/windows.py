"""The sliding-window protocol shared by evaluation and datastore extraction.

Position p predicts token p + 1. Windows of ``context`` tokens advance by ``stride``; each window scores only
the positions no earlier window scored (Hugging Face's perplexity protocol). With stride < context every
position is scored exactly once and, past the first window, sees at least ``context - stride`` tokens (itself
included); with stride == context the windows are disjoint and the last position of each window, whose next
token starts the following window, is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlpmem.errors import UsageError


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    first_scored: int  # first position scored; positions first_scored .. end - 2 are scored

    @property
    def n_scored(self) -> int:
        return self.end - 1 - self.first_scored


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows covering positions 0 .. n_tokens - 2, each scored once (see module docstring)."""
    if stride > context:
        raise UsageError(f"stride ({stride}) must not exceed the context ({context})", field="stride")
    if n_tokens < 2:
        raise UsageError(f"need at least 2 tokens to score, got {n_tokens}")
    windows, begin, next_pos = [], 0, 0
    while True:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, max(next_pos, begin)))
        if end == n_tokens:
            return windows
        next_pos = end - 1
        begin += stride
