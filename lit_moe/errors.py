"""Errors that mean "the user asked for something that cannot work" (as opposed to bugs).

The CLI turns these into one clear message and a non-zero exit instead of a traceback.
"""


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; the message says how."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/Inf under `nan_policy: stop`; the message names the step and layer."""
