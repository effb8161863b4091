"""Errors a user can fix, as opposed to bugs.

Entry points print a UserError as one line and exit non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in input the user controls: config, files, devices, prompts."""


class ConfigError(UserError):
    """A config value that is wrong or impossible; the message names the key."""


class DataError(UserError):
    """A dataset source that is missing, unreachable or not what was expected."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or incompatible."""


class DeviceError(UserError):
    """A device that was asked for but is not available here."""
