"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the user's input (path, config, model, artifact), not a bug in mlpmem.

    ``field`` names the config field at fault; the CLI shows it as its flag (``--field-name: message``), library
    callers read it as the field.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def for_cli(self) -> str:
        text = " ".join(str(self).split())  # one line, whatever the message held
        return f"--{self.field.replace('_', '-')}: {text}" if self.field else text
