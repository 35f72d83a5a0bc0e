"""Transport and caller security: TLS credentials (optionally mutual) and bearer-token roles as a server
interceptor; health checks stay open.

Tokens file: one ``ROLE TOKEN`` pair per line; a line whose first non-blank character is ``#`` is a comment (a ``#``
anywhere else is part of the token). ``search`` may call Search, SearchBatch,
GetIndexInfo and reflection; ``admin`` may also call Reload. Clients send ``authorization: Bearer TOKEN``.
Every configured token is compared in constant time (``hmac.compare_digest``), all of them on every call.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cbmir.errors import InvalidInputError, PermissionDeniedError, UnauthenticatedError

from .config import ServerConfig
from .status import wrap_behaviour

ROLES = ("search", "admin")
MIN_TOKEN_CHARS = 16
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_METHODS = (
    "/cbmir.v1.Retrieval/Reload",
    "/cbmir.v1.Retrieval/AddImages",
    "/cbmir.v1.Retrieval/RemoveImages",
)


def read_tokens(path: str | os.PathLike[str]) -> list[tuple[bytes, str]]:
    """Parse a tokens file into (token, role) pairs; a malformed line is an error naming its number."""
    tokens: list[tuple[bytes, str]] = []
    try:
        lines = open(path).read().splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read tokens file {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise InvalidInputError(f"{path}:{number}: expected 'ROLE TOKEN' with ROLE one of {ROLES}")
        if len(parts[1]) < MIN_TOKEN_CHARS:
            raise InvalidInputError(f"{path}:{number}: tokens need at least {MIN_TOKEN_CHARS} characters")
        tokens.append((parts[1].encode(), parts[0]))
    if not tokens:
        raise InvalidInputError(f"tokens file {path} defines no token")
    return tokens


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid token (UNAUTHENTICATED) or with too small a role (PERMISSION_DENIED)."""

    def __init__(self, tokens: list[tuple[bytes, str]]) -> None:
        self._tokens = tokens

    def role_of(self, metadata: Any) -> str | None:
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer ") :].encode()
        role = None
        for token, token_role in self._tokens:
            if hmac.compare_digest(given, token):
                role = token_role
        return role

    def check(self, method: str, metadata: Any) -> None:
        role = self.role_of(metadata)
        if role is None:
            raise UnauthenticatedError("missing or invalid bearer token; send metadata 'authorization: Bearer TOKEN'")
        if method in ADMIN_METHODS and role != "admin":
            raise PermissionDeniedError(f"{method} needs an admin token")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        try:
            self.check(method, handler_call_details.invocation_metadata)
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            return _refusing(handler, exc)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, exc: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same shape that raises ``exc`` on every call (the error interceptor sets its status)."""

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        raise exc

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raise exc
        yield  # a generator, like the handler it replaces

    return wrap_behaviour(handler, lambda _: unary, lambda _: stream)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (mutual TLS when a client CA is given); None for plaintext."""
    if not config.tls_cert and not config.tls_key:
        if config.tls_client_ca:
            raise InvalidInputError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise InvalidInputError("TLS needs both --tls-cert and --tls-key")

    def read(path: str, what: str) -> bytes:
        try:
            return open(path, "rb").read()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {what} {path}: {exc}") from exc

    client_ca = read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key, "TLS key"), read(config.tls_cert, "TLS certificate"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
