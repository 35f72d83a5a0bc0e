"""The one place where exceptions become gRPC status codes: a server interceptor wrapping every handler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cbmir.errors import (
    BundleError,
    InvalidInputError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
)

log = logging.getLogger("cbmir.server")

STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message for an exception; unexpected ones become INTERNAL."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has details"


def abort_with(context: grpc.ServicerContext, exc: Exception) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in handler")
    context.abort(code, message)


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns exceptions raised by handlers into ``context.abort(code, message)`` using :data:`STATUS_OF`."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return inner_uu(request, context)
                except Exception as exc:  # noqa: BLE001  (mapped, never swallowed)
                    if _is_abort(exc):
                        raise
                    abort_with(context, exc)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner_us(request, context)
                except Exception as exc:  # noqa: BLE001
                    if _is_abort(exc):
                        raise
                    abort_with(context, exc)

            return handler._replace(unary_stream=unary_stream)
        return handler


def _is_abort(exc: BaseException) -> bool:
    # context.abort() signals by raising a bare, argument-less Exception; let it through untouched.
    return type(exc) is Exception and not exc.args
