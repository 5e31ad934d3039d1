"""The generated gRPC code of `splitclip.v1.SplitClip` and the servicer functions Serve's proxy loads
(`grpc_servicer_functions` in deploy/serve_config.yaml): SplitClip, and grpc.health.v1.Health
(cloud_service.health) for health probes. The messages' `__module__` is their real import path
(`splitclip.wire.splitclip_pb2`, `cloud_service.health`), so Ray can pickle them between the proxy
and replicas. Requests parse leniently (cloud_service.lenient): bytes that are not a valid message
reach the ingress as an `Unparsed`, refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

from cloud_service import health
from cloud_service.lenient import Unparsed, add_service
from splitclip.wire import pb, pb_grpc


def add_SplitClipServicer_to_server(servicer: Any, server: Any) -> None:
    """pb_grpc's function of the same name, with lenient request parsing."""
    messages = {name: getattr(pb, name) for name in pb.DESCRIPTOR.message_types_by_name}
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["SplitClip"], messages)


add_HealthServicer_to_server = health.add_HealthServicer_to_server
SERVICER_FUNCTION = f"{__name__}.add_SplitClipServicer_to_server"
HEALTH_SERVICER_FUNCTION = f"{__name__}.add_HealthServicer_to_server"

__all__ = [
    "HEALTH_SERVICER_FUNCTION",
    "SERVICER_FUNCTION",
    "Unparsed",
    "add_HealthServicer_to_server",
    "add_SplitClipServicer_to_server",
    "pb",
    "pb_grpc",
]
