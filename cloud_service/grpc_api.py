"""The generated gRPC code of `splitclip.v1.SplitClip` and the servicer function Serve's proxy loads
(`grpc_servicer_functions` in deploy/serve_config.yaml). The messages' `__module__` is their real
import path (`splitclip.wire.splitclip_pb2`), so Ray can pickle them between the proxy and replicas.
"""

from __future__ import annotations

from splitclip.wire import pb, pb_grpc

add_SplitClipServicer_to_server = pb_grpc.add_SplitClipServicer_to_server
SERVICER_FUNCTION = f"{__name__}.add_SplitClipServicer_to_server"

__all__ = ["SERVICER_FUNCTION", "add_SplitClipServicer_to_server", "pb", "pb_grpc"]
