"""Errors users can act on. The CLI prints them as one line; anything else is a bug."""


class MoeforgeError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 1


class ConfigError(MoeforgeError):
    """Bad usage or configuration: exit code 2."""

    exit_code = 2


class SourceError(MoeforgeError):
    """A source model is missing, unreadable or incompatible: exit code 2."""

    exit_code = 2
