"""Exceptions raised at sdrt's edges.

Each is also a built-in exception type (ValueError, FileNotFoundError, ...) so that
callers embedding sdrt can catch the usual types; the CLI turns any of them into a
one-line message and exit code 2.
"""


class SdrtError(Exception):
    """Base of every error sdrt raises on purpose."""


class InvalidInput(SdrtError, ValueError):
    """A value given by the user is out of range or of the wrong kind."""


class InvalidType(SdrtError, TypeError):
    """A value given by the user is of the wrong type."""


class MissingFile(SdrtError, FileNotFoundError):
    """A file or folder the user named, or one it must contain, is not there."""


class ArtifactError(SdrtError, ValueError):
    """An artifact folder or engine cache is incomplete, corrupt or mismatched."""


class NumericsError(SdrtError, FloatingPointError):
    """A stage produced NaN or Inf."""


class BackendUnavailable(SdrtError, RuntimeError):
    """The requested backend (TensorRT, CUDA provider, ...) cannot run here."""


class AlreadyExists(SdrtError, FileExistsError):
    """The output exists and the user did not ask to overwrite it."""
