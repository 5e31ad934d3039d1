"""`splitclip cloud probe`: one grpc.health.v1 Check of the cloud; exit 0 when SERVING, 1 otherwise."""

from __future__ import annotations

import argparse
import sys

HELP = "check the cloud's health over gRPC (grpc.health.v1 Check): exit 0 when SERVING"

DESCRIPTION = """\
Call /grpc.health.v1.Health/Check on the cloud's gRPC port, the call Kubernetes' gRPC probe and
grpc_health_probe make, through Serve's gRPC proxy to the ingress. Exit 0 and print the address and
SERVING; otherwise exit 1 with one line on stderr saying why (NOT_SERVING: a downstream deployment
did not answer; or the gRPC status of a failed call, e.g. UNAVAILABLE for a closed port, NOT_FOUND
for an unknown --service). Usable as a Kubernetes exec probe or from scripts."""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--address", default="127.0.0.1:9000", help="the cloud's gRPC HOST:PORT (default %(default)s)"
    )
    p.add_argument(
        "--service",
        default="",
        help='the service to ask about: "" (the server, default) or splitclip.v1.SplitClip',
    )
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds before giving up (default %(default)s)"
    )
    p.add_argument(
        "--application",
        default="",
        help="Serve application metadata, only needed when several applications share the cluster",
    )


def run(args: argparse.Namespace) -> int:
    import grpc

    from cloud_service.health import probe

    try:
        status = probe(args.address, args.service, timeout_s=args.timeout, application=args.application)
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        details = " ".join(str(e.details() if isinstance(e, grpc.Call) else e).split())  # one line
        print(f"probe {args.address}: {code.name if code else 'error'}: {details}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"probe {args.address}: {status}", file=sys.stderr)
        return 1
    print(f"{args.address}: SERVING")
    return 0
