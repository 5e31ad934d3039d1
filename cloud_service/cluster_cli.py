"""`splitclip cluster up|down|status`: a multi-node Ray cluster on this machine running the cloud service.

The work is cloud_service/cluster.py's; this module only parses flags and prints.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "a multi-node Ray cluster on this machine (head + workers) running the cloud service"

DESCRIPTION = """\
up: an embedded Valkey, `ray start --head` (the Serve controller, the gRPC proxy and the small
deployments) and N `ray start --address` worker nodes (the VisionTail replicas, label resource
splitclip_worker), each in its own process session; then `serve deploy` of deploy/serve_config.yaml
with this cluster's ports and placement. Prints the gRPC address. State (pids, ports, logs) lives in
--dir; `down` stops exactly what `up` started. SPLITCLIP_NODE_TOKEN, when set, reaches every replica."""


def build_parser(p: argparse.ArgumentParser) -> None:
    from cloud_service.cluster import DEFAULT_DIR

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="cluster_command", metavar="{up,down,status}", required=True)
    u = sub.add_parser("up", help="start the cluster and deploy the service")
    d = sub.add_parser("down", help="stop everything `up` started")
    s = sub.add_parser("status", help="nodes and Serve replicas, as JSON")
    for q in (u, d, s):
        q.add_argument("--dir", default=str(DEFAULT_DIR), help=f"state directory (default {DEFAULT_DIR})")
    u.add_argument("--bundle", required=True, help="bundle directory")
    u.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    u.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per worker node (default 1)")
    u.add_argument("--head-cpus", type=float, default=1.0, help="CPUs of the head node (default 1)")
    u.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    u.add_argument("--config", default=None, help="Serve config (default: deploy/serve_config.yaml)")


def run(args: argparse.Namespace) -> int:
    from cloud_service import cluster

    if args.cluster_command == "up":
        print(f"splitclip cluster: starting in {args.dir} ...", flush=True)
        c = cluster.up(
            args.dir, args.bundle, workers=args.workers, worker_cpus=args.worker_cpus,
            head_cpus=args.head_cpus, grpc_port=args.port, config=args.config,
        )  # fmt: skip
        print(
            f"splitclip cluster: gRPC on {c.address} (head + {len(c.workers)} workers, Ray at "
            f"{c.ray_address}, dashboard {c.dashboard}, Valkey {c.redis_url}); "
            f"stop with: splitclip cluster down --dir {c.dir}",
            flush=True,
        )
        return 0
    if args.cluster_command == "down":
        try:
            stopped = cluster.down(args.dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"splitclip cluster: stopped {', '.join(stopped)}")
        return 0
    c = cluster.Cluster.load(args.dir)
    nodes = {n.name: {"pid": n.pid, "alive": bool(cluster.session_members(n.pid))} for n in c.nodes}
    replicas = [
        {"state": r["state"], "node": c.node_of_pid(r.get("pid") or -1)} for r in c.replicas("VisionTail")
    ]
    print(json.dumps({"address": c.address, "app": c.app_status(), "nodes": nodes, "VisionTail": replicas}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splitclip cluster")
    build_parser(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
