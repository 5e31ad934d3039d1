"""Servicer registration whose requests parse leniently, so that bytes which are not a valid message
are refused with INVALID_ARGUMENT instead of gRPC's UNKNOWN.

Serve's gRPC proxy keeps each registered handler's `request_deserializer` and replaces only the
behaviour (ray/serve/_private/grpc_util.py, `gRPCGenericServer._override_method_handler`). A
deserializer that raises makes grpc's asyncio server end the call with UNKNOWN "Unexpected <class
'google.protobuf.message.DecodeError'>" before the proxy is reached, and nothing in between can set
the code. So the deserializers here never raise: bytes that do not parse become an `Unparsed`, which
the proxy forwards (pickled, like any request) to the ingress, and the ingress refuses it
(cloud_service.ingress, cloud_service.pipeline). In a stream the bad message becomes one refused
Result and the stream goes on. Imports only grpc and protobuf (cloud_service.health starts fast).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

# (client streaming, server streaming) -> grpc's handler factory
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True)
class Unparsed:
    """A request whose bytes are not a valid `message_type` (the parser's complaint in `error`)."""

    message_type: str
    size: int
    error: str

    @property
    def message(self) -> str:
        return f"request: {self.size} bytes are not a valid {self.message_type}: {self.error}"


def lenient(message_class: Any) -> Callable[[bytes], Any]:
    """`message_class.FromString`, returning an `Unparsed` instead of raising."""
    name = message_class.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return message_class.FromString(raw)
        except Exception as e:  # DecodeError, or whatever else the parser makes of hostile bytes
            return Unparsed(name, len(raw), str(e) or type(e).__name__)

    return parse


def add_service(servicer: Any, server: Any, service: ServiceDescriptor, classes: Mapping[str, Any]) -> None:
    """Register every method of `service` on `server` as generated `add_*Servicer_to_server` functions
    do, with lenient request parsing; `classes` maps message names to their Python classes."""
    handlers = {
        m.name: _HANDLERS[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=lenient(classes[m.input_type.name]),
            response_serializer=classes[m.output_type.name].SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
