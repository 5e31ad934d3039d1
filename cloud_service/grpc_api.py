"""The generated gRPC code, made picklable for Ray, and the servicer function Serve's proxy loads.

protoc names the message module `splitclip_pb2` (that is their `__module__`), but it is imported as
`splitclip.wire.splitclip_pb2`; Ray pickles requests and results between the proxy and the replicas,
and pickle finds classes by `__module__`. Registering the alias in every process that imports this
module (the proxy via `grpc_servicer_functions`, the replicas via the deployments) fixes that.
"""

from __future__ import annotations

import sys

from splitclip.wire import pb, pb_grpc

sys.modules.setdefault(pb.Frame.__module__, pb)

add_SplitClipServicer_to_server = pb_grpc.add_SplitClipServicer_to_server
SERVICER_FUNCTION = f"{__name__}.add_SplitClipServicer_to_server"

__all__ = ["SERVICER_FUNCTION", "add_SplitClipServicer_to_server", "pb", "pb_grpc"]
