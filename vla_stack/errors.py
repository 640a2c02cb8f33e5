"""User-facing errors: the CLI prints these as one line, never a traceback."""


class VlaStackError(Exception):
    """Base class for errors caused by bad input or environment, not by a bug."""


class UnknownNameError(VlaStackError, KeyError):
    """An unknown robot, task or camera name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreError(VlaStackError):
    """A dataset store is missing, unwritable, corrupt or incompatible."""
