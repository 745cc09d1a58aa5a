"""The root of fedssl's typed errors.

Each service defines errors named for the condition (`DatasetNotFound`, `ModelNotFound`…)
as subclasses, so callers can catch `FedSSLError` for "a fedssl problem the user can act on".
"""


class FedSSLError(Exception):
    """A problem with a message a user can act on (what was wrong, what was expected)."""


class ConfigError(FedSSLError, ValueError):
    """A setting has a value fedssl cannot use; the message names the setting."""


class WeightsError(FedSSLError, ValueError):
    """A weights file is not a safetensors file fedssl can load into the expected model."""
