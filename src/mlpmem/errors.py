"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UsageError(Exception):
    """A problem with the user's input (path, config, model, artifact), not a bug in mlpmem."""
