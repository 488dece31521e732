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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM. `partial` is the kept partial build (resumable with --resume), if there is one."""

    def __init__(self, signum: int = 2, partial=None):
        super().__init__(signum, partial)
        self.signum = signum
        self.partial = partial

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        import signal

        what = "interrupted" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"
        if self.partial is None:
            return f"{what}; nothing was written to the output path"
        return f"{what}; the partial build is kept in {self.partial}; run the same command with --resume to continue it"
