"""Errors of the Flower app (hospital and aggregator sides), named for the condition."""

from fedssl_core.errors import ConfigError, FedSSLError

__all__ = ["ConfigError", "DatasetMalformed", "DatasetNotFound", "FedSSLError", "KaggleDownloadError", "LabelMismatch",
           "RunFailed"]


class DatasetNotFound(FedSSLError, FileNotFoundError):
    """No dataset where the hospital's node config says it is."""


class DatasetMalformed(FedSSLError, ValueError):
    """A dataset is there but not in the expected layout (columns, folders, images)."""


class KaggleDownloadError(FedSSLError, RuntimeError):
    """Downloading a Kaggle dataset failed; nothing partial was left behind."""


class LabelMismatch(DatasetMalformed):
    """Hospitals' class folders do not map onto one class list (unmatched, ambiguous or missing)."""


class RunFailed(FedSSLError, RuntimeError):
    """The federation cannot go on (too few hospitals, hospitals failing at start-up)."""
