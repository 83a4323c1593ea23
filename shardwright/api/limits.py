"""Request size limit with a message a person can act on.

gRPC's own limit answers RESOURCE_EXHAUSTED "Received message larger than max (N vs. M)", which
says neither which limit nor how to change it. This interceptor refuses unary requests (every
Shardwright call takes one request message) over `limit_bytes` itself, before they are parsed,
naming the size, the limit and the flag that raises it. gRPC's own limit stays as a backstop at
`core_limit_bytes(limit_bytes)` so that no request beyond it is ever buffered.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

MIB = 1024 * 1024


def core_limit_bytes(limit_bytes: int) -> int:
    """gRPC's hard receive limit: room above ours so that our message is the one people see."""
    return 2 * limit_bytes + MIB


@dataclass(frozen=True)
class Oversized:
    """Stands in for a request that was too large to parse."""

    num_bytes: int


def _size(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.1f} MiB" if num_bytes >= MIB else f"{num_bytes / 1024:.1f} KiB"


def too_large_message(num_bytes: int, limit_bytes: int) -> str:
    return (f"request is {_size(num_bytes)} ({num_bytes} bytes), over this server's limit of {_size(limit_bytes)}: "
            "send a shorter prompt or job file, or raise the limit with `shardwright serve --max-request-mib`")


class RequestSizeInterceptor(grpc.ServerInterceptor):
    """Refuses unary requests over `limit_bytes` with RESOURCE_EXHAUSTED (streaming requests,
    i.e. reflection, are left to gRPC's own limit)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        return self._wrap(handler)

    def _wrap(self, handler):
        limit, parse = self.limit_bytes, handler.request_deserializer

        def deserialize(data: bytes):
            if len(data) > limit:
                return Oversized(len(data))
            return parse(data) if parse else data

        def refuse(request, context) -> None:
            if isinstance(request, Oversized):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large_message(request.num_bytes, limit))

        if handler.response_streaming:
            def stream(request, context):
                refuse(request, context)
                yield from handler.unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=deserialize,
                                                        response_serializer=handler.response_serializer)

        def unary(request, context):
            refuse(request, context)
            return handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deserialize,
                                                   response_serializer=handler.response_serializer)
