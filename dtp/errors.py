"""Errors caused by the user's input, reported as one clear line instead of a traceback."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, launch); the message names the problem and the fix."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class TrainingError(UserError):
    """Training cannot go on (for example a NaN loss); the last checkpoint is left intact."""
