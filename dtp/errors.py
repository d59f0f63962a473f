"""Errors caused by the user's input, reported as one clear line instead of a traceback."""
import sys


class UserError(Exception):
    """Bad input (config, data, checkpoint, launch); the message names the problem and the fix."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class TrainingError(UserError):
    """Training cannot go on (for example a NaN loss); the last checkpoint is left intact."""


def report_error(exc: UserError, show: bool = True) -> None:
    """Print the error's one `error:` line now, flushed, and only once per error.

    Under torchrun the main rank (rank 0) reports before it tells the other ranks to stop: once any rank exits,
    torchrun terminates the rest, and a message still unprinted would be lost.
    """
    if show and not getattr(exc, "reported", False):
        print(f"error: {exc}", file=sys.stderr, flush=True)
        exc.reported = True
