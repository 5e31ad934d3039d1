"""Compile protos/*.proto into splitclip/wire/ with grpcio-tools, and check the result is current.

`python -m splitclip.protogen` regenerates; `ensure_current()` raises when the generated code is
missing or was built from another version of the .proto.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO = PROTO_DIR / "splitclip.proto"
OUT_DIR = Path(__file__).resolve().parent / "wire"
STAMP = OUT_DIR / "PROTO_SHA256"


class StaleProtoError(RuntimeError):
    pass


def proto_digest() -> str:
    return hashlib.sha256(PROTO.read_bytes()).hexdigest()


def generate() -> None:
    from grpc_tools import protoc  # build-time tool, only needed here

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    # protoc writes `import splitclip_pb2` and names the message module `splitclip_pb2`; use the real
    # package path, so imports work and Ray can pickle messages between the proxy and the replicas.
    grpc_file = OUT_DIR / "splitclip_pb2_grpc.py"
    grpc_file.write_text(
        grpc_file.read_text().replace("import splitclip_pb2 as", "from . import splitclip_pb2 as")
    )
    pb2_file = OUT_DIR / "splitclip_pb2.py"
    pb2_file.write_text(pb2_file.read_text().replace("'splitclip_pb2'", "'splitclip.wire.splitclip_pb2'"))
    STAMP.write_text(proto_digest() + "\n")


def ensure_current() -> None:
    if not PROTO.exists():  # installed without the source tree: trust what was generated
        return
    if not STAMP.exists() or not (OUT_DIR / "splitclip_pb2.py").exists():
        raise StaleProtoError(
            "generated gRPC code is missing: run `make install` (python -m splitclip.protogen)"
        )
    if STAMP.read_text().strip() != proto_digest():
        raise StaleProtoError(
            f"generated gRPC code is stale ({PROTO.name} changed): run `make install` (python -m splitclip.protogen)"
        )


if __name__ == "__main__":
    generate()
    print(
        f"generated gRPC code for {PROTO.relative_to(ROOT)} in {OUT_DIR.relative_to(ROOT)}", file=sys.stderr
    )
