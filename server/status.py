"""The one place where exceptions become gRPC status codes: a server interceptor wrapping every handler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc

from cbmir.errors import (
    BackendUnavailableError,
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
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
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
    """End the call with the exception's status; unexpected exceptions are logged with their traceback."""
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in handler")
    context.abort(code, message)


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """The one place where handler exceptions become statuses: ``context.abort(code, message)`` per
    :data:`STATUS_OF`, for every handler shape (unary or streaming requests and responses).

    It must be the first (outermost) interceptor so that it also maps what later interceptors raise.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_deserializer is not None:  # bytes that are no message: INVALID_ARGUMENT, not INTERNAL
            handler = replace_behaviour(handler, request_deserializer=_tolerant(handler.request_deserializer))
        method = handler_call_details.method
        return wrap_behaviour(
            handler, lambda inner: _mapped_unary(inner, method), lambda inner: _mapped_stream(inner, method)
        )


def replace_behaviour(handler: grpc.RpcMethodHandler, **behaviour: Any) -> grpc.RpcMethodHandler:
    """The handler with other behaviour functions (grpc's handlers are named tuples, untyped as such)."""
    return cast(grpc.RpcMethodHandler, cast(Any, handler)._replace(**behaviour))


@dataclass(frozen=True)
class Unparseable:
    """Stands in for a request whose bytes are no valid message; the handler wrapper refuses it."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return Unparseable(type(exc).__name__)

    return parse


def _parsed(request: Any, method: str) -> Any:
    """The request, or InvalidInputError when its bytes did not parse (a stream's items are checked as they come)."""
    if isinstance(request, Unparseable):
        raise InvalidInputError(
            f"the request to {method} is not a valid protobuf message ({request.error}); build it from "
            "proto/cbmir/v1/retrieval.proto"
        )
    if isinstance(request, Iterator):
        return (_parsed(item, method) for item in request)
    return request


def wrap_behaviour(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler:
    """The handler with its behaviour function replaced by ``unary(f)`` (single response) or ``stream(f)``
    (streamed response), whatever the request side; the one place that knows gRPC's four handler shapes."""
    for attribute, wrap in (
        ("unary_unary", unary),
        ("stream_unary", unary),
        ("unary_stream", stream),
        ("stream_stream", stream),
    ):
        inner = getattr(handler, attribute)
        if inner is not None:
            return replace_behaviour(handler, **{attribute: wrap(inner)})
    return handler


def _mapped_unary(
    inner: Callable[[Any, grpc.ServicerContext], Any], method: str
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return inner(_parsed(request, method), context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            abort_with(context, exc)

    return handle


def _mapped_stream(
    inner: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from inner(_parsed(request, method), context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            abort_with(context, exc)

    return handle


def _is_abort(exc: BaseException) -> bool:
    # context.abort() signals by raising a bare, argument-less Exception; let it through untouched.
    return type(exc) is Exception and not exc.args
