"""Bearer-token authentication: tokens map to tenants.

The tenants file (shardwright.tenants, README "Tenants") lists each tenant's tokens, path roots,
highest priority class and quota; the old tokens format `{token: tenant}` is still read:

    s3cr3t-alice: alice
    s3cr3t-bob: bob

Calls carry `authorization: Bearer TOKEN` metadata. Without a tokens file the server runs open,
everyone is tenant "default", and it refuses to listen beyond loopback (see `serve`).
Health checks and reflection need no token (the kubelet's probes send none).
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from shardwright.tenants import OPEN_TENANT, load_tenants

PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
TENANT_KEY = "x-shardwright-tenant"


def load_tokens(path: Path) -> dict[str, str]:
    """Token -> tenant from the tenants (or old tokens) file `path`; raises ValueError naming the problem."""
    return {token: policy.name for policy in load_tenants(path) for token in policy.tokens}


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


class Authenticator:
    """Finds the tenant of a call; None tokens means the open single-tenant mode."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        self.tokens = tokens

    @property
    def open(self) -> bool:
        return self.tokens is None

    def tenant(self, metadata) -> str | None:
        if self.tokens is None:
            return OPEN_TENANT
        token = bearer_token(metadata)
        if token is None:
            return None
        for known, tenant in self.tokens.items():  # constant-time compare against each token
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid token with UNAUTHENTICATED before any handler runs."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def intercept_service(self, continuation, details):
        if details.method.startswith(PUBLIC_PREFIXES) or self.auth.open:
            return continuation(details)
        if self.auth.tenant(details.invocation_metadata) is not None:
            return continuation(details)
        return _deny(continuation(details))


def _deny(handler):
    message = "missing or invalid bearer token: send metadata 'authorization: Bearer TOKEN' (SHARDWRIGHT_TOKEN)"

    def unary(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    if handler is None:
        return None
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


def tenant_of(context: grpc.ServicerContext, auth: Authenticator) -> str:
    """The calling tenant (the interceptor has already refused unauthenticated calls)."""
    tenant = auth.tenant(context.invocation_metadata())
    if tenant is None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
    return tenant
