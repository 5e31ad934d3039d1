"""Compile protos/*.proto into splitclip/wire/ with grpcio-tools, and check the result is current.

Every package build runs `generate()` (setup.py's build_py hook): into the build tree for a wheel, into
the source tree for an editable install. `python -m splitclip.protogen` regenerates in the source tree
(`make install` does it when the .proto changes). `ensure_current()` raises when the generated code is
missing or was built from another version of the .proto.

This module imports only the standard library at the top: setup.py loads it by path at build time,
before anything else of the package is installed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO = PROTO_DIR / "splitclip.proto"
OUT_DIR = Path(__file__).resolve().parent / "wire"
STAMP_NAME = "PROTO_SHA256"
STAMP = OUT_DIR / STAMP_NAME
GENERATED = ("splitclip_pb2.py", "splitclip_pb2_grpc.py")  # (+ splitclip_pb2.pyi, for type checkers only)
REGENERATE = "run `python -m splitclip.protogen` (or `make install`, or reinstall the package)"


class StaleProtoError(RuntimeError):
    pass


def proto_digest(proto: Path = PROTO) -> str:
    return hashlib.sha256(proto.read_bytes()).hexdigest()


def generate(out_dir: Path = OUT_DIR, proto: Path = PROTO) -> None:
    """Write the generated modules and the digest stamp of `proto` into `out_dir`."""
    from grpc_tools import protoc  # build-time tool, only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    # protoc writes `import splitclip_pb2` and names the message module `splitclip_pb2`; use the real
    # package path, so imports work and Ray can pickle messages between the proxy and the replicas.
    grpc_file = out_dir / "splitclip_pb2_grpc.py"
    grpc_file.write_text(
        grpc_file.read_text().replace("import splitclip_pb2 as", "from . import splitclip_pb2 as")
    )
    pb2_file = out_dir / "splitclip_pb2.py"
    pb2_file.write_text(pb2_file.read_text().replace("'splitclip_pb2'", "'splitclip.wire.splitclip_pb2'"))
    (out_dir / STAMP_NAME).write_text(proto_digest(proto) + "\n")


def ensure_current() -> None:
    missing = [p.name for p in (STAMP, *(OUT_DIR / name for name in GENERATED)) if not p.exists()]
    if missing:
        raise StaleProtoError(f"generated gRPC code is missing ({', '.join(missing)}): {REGENERATE}")
    # Installed from a wheel there is no .proto beside the package: the build stamped what it compiled.
    if PROTO.exists() and STAMP.read_text().strip() != proto_digest():
        raise StaleProtoError(f"generated gRPC code is stale ({PROTO.name} changed): {REGENERATE}")


if __name__ == "__main__":
    generate()
    print(
        f"generated gRPC code for {PROTO.relative_to(ROOT)} in {OUT_DIR.relative_to(ROOT)}", file=sys.stderr
    )
