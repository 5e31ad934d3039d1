"""Generated gRPC/protobuf code for protos/splitclip.proto (built with the package, see splitclip.protogen)."""

from splitclip.protogen import ensure_current

ensure_current()

from splitclip.wire import splitclip_pb2 as pb  # noqa: E402
from splitclip.wire import splitclip_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
