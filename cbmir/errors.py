"""Exception types shared by the offline tools and the service.

The gRPC layer maps each class to one status code in a single place (``cbmir.server.status``); the CLI prints the
message and exits non-zero. Messages say what was wrong and how to fix it.
"""


class CbmirError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(CbmirError, ValueError):
    """The caller sent something unusable: an undecodable image, k out of range, a wrong-size vector, ..."""


class NotFoundError(CbmirError, LookupError):
    """A named thing (archive id, index bundle, method) does not exist."""


class BundleError(CbmirError):
    """An index bundle is missing, half-written, truncated or altered."""


class NotReadyError(CbmirError):
    """The service has not finished loading or is shutting down."""


class BackendUnavailableError(CbmirError):
    """An engine this package drives (Milvus search, a local Ray) cannot be reached or started; retry later."""


class OverloadedError(CbmirError):
    """Too many requests in flight; the caller should retry with back-off."""


class UnauthenticatedError(CbmirError):
    """The request carries no valid bearer token."""


class PermissionDeniedError(CbmirError):
    """The token is valid but its role may not call this method."""


SHOWN_CHARS = 100
"""Longest piece of a caller's string that an error message repeats."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr`` of a caller-supplied value for an error message, cut to ``limit`` characters plus its length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
