"""The generated gRPC code of `splitclip.v1.SplitClip` and the servicer functions Serve's proxy loads
(`grpc_servicer_functions` in deploy/serve_config.yaml): SplitClip, and grpc.health.v1.Health
(cloud_service.health) for health probes. The messages' `__module__` is their real import path
(`splitclip.wire.splitclip_pb2`, `cloud_service.health`), so Ray can pickle them between the proxy
and replicas.
"""

from __future__ import annotations

from cloud_service import health
from splitclip.wire import pb, pb_grpc

add_SplitClipServicer_to_server = pb_grpc.add_SplitClipServicer_to_server
add_HealthServicer_to_server = health.add_HealthServicer_to_server
SERVICER_FUNCTION = f"{__name__}.add_SplitClipServicer_to_server"
HEALTH_SERVICER_FUNCTION = f"{__name__}.add_HealthServicer_to_server"

__all__ = [
    "HEALTH_SERVICER_FUNCTION",
    "SERVICER_FUNCTION",
    "add_HealthServicer_to_server",
    "add_SplitClipServicer_to_server",
    "pb",
    "pb_grpc",
]
