"""The domain errors and the one table that maps each to an HTTP status and a Triton error code.

Every error a user can act on derives from :class:`UserError`: the CLI prints its message on one line (exit 1),
BentoML answers its HTTP status, Triton its error code. Nothing chooses a status from an error's text.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad input, unknown name, missing file); the message says what and how."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class BadRequest(UserError):
    """A request, option or file the code refuses as given."""


class Unauthorized(UserError):
    """An admin call without the right token."""


class Forbidden(UserError):
    """A path outside what the service may read."""


class NotFound(UserError):
    """An unknown head, version, model or build."""


class Conflict(UserError):
    """A change that clashes with the current state (a known version with other bytes, the last live head)."""


class Refused(UserError):
    """A model file that fails admission: sha256, ONNX load, names, shapes, backbone, test run."""


class Unavailable(UserError):
    """Nothing can answer right now: no head has traffic weight, a routed head is missing."""


class BuildError(UserError):
    """A build directory that is missing, inconsistent, of an unknown format or fails its sha256 checks."""


class ModelFault(Exception):
    """A model that failed on input it had accepted: the server's fault, not the client's."""


# (HTTP status, Triton error code: an attribute of pb_utils.TritonError / a gRPC status name)
ERROR_TABLE: dict[type[BaseException], tuple[int, str]] = {
    BadRequest: (400, "INVALID_ARG"),
    Unauthorized: (401, "INVALID_ARG"),
    Forbidden: (403, "INVALID_ARG"),
    NotFound: (404, "NOT_FOUND"),
    Conflict: (409, "ALREADY_EXISTS"),
    Refused: (422, "INVALID_ARG"),
    BuildError: (422, "INVALID_ARG"),
    Unavailable: (503, "UNAVAILABLE"),
    ModelFault: (500, "INTERNAL"),
}
_FAULT = (500, "INTERNAL")


def _entry(exc: BaseException) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return _FAULT


def http_status(exc: BaseException) -> int:
    """The HTTP status that answers ``exc`` (500 for anything not in the table: a fault of ours)."""
    return _entry(exc)[0]


def triton_code(exc: BaseException) -> str:
    """The Triton error code (``pb_utils.TritonError`` attribute name) that answers ``exc``."""
    return _entry(exc)[1]
