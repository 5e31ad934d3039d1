"""`splitclip cloud --bundle B`: run the cloud service on this machine.

Starts a local Ray, an embedded Valkey (unless SPLITCLIP_REDIS_URL or --redis-url names a Redis),
with --search (SPLITCLIP_SEARCH=1) an embedded PostgreSQL for fleet search (unless SPLITCLIP_PG_URL or
--pg-url names one: the replicas never start one themselves), deploys deploy/serve_config.yaml with
the bundle, prints the gRPC address and serves until Ctrl-C; it stops what it started on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

HELP = "start the Ray Serve cloud service (local Ray, embedded Valkey)"

DESCRIPTION = """\
Start the splitclip cloud service on this machine: a local Ray cluster running Ray Serve with
deploy/serve_config.yaml (the same file `serve deploy` uses), reachable through Serve's gRPC proxy
as service splitclip.v1.SplitClip. The prompt cache and node registry live in Redis:
SPLITCLIP_REDIS_URL (or --redis-url) points at one, otherwise an embedded Valkey is started.
Set SPLITCLIP_NODE_TOKEN to require the token from every node (metadata x-splitclip-token or
`authorization: Bearer TOKEN`). With --search the cloud keeps the embeddings of frames nodes send
with `index` (SPLITCLIP_INDEX on the node) in PostgreSQL + pgvector and answers the Search and Upload
RPCs (docs/search.md)."""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--bundle", default=None, help="bundle directory (SPLITCLIP_BUNDLE)")
    p.add_argument("--config", default=None, help="Serve config (default: deploy/serve_config.yaml)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="gRPC port (SPLITCLIP_GRPC_PORT, else the Serve config's: 9000)",
    )
    p.add_argument(
        "--http-port", type=int, default=None, help="Serve HTTP proxy port (default: the config's)"
    )
    p.add_argument(
        "--redis-url", default=None, help="Redis URL (SPLITCLIP_REDIS_URL); unset: embedded Valkey"
    )
    p.add_argument(
        "--search",
        action="store_true",
        default=None,
        help="fleet search: store indexed frames, answer Search / Upload (SPLITCLIP_SEARCH)",
    )
    p.add_argument(
        "--pg-url", default=None, help="PostgreSQL with pgvector (SPLITCLIP_PG_URL); unset: embedded"
    )
    p.add_argument(
        "--pg-data-dir",
        type=Path,
        default=None,
        help="data dir of the embedded PostgreSQL (SPLITCLIP_PG_DATA_DIR; default ~/.cache/splitclip/pg, "
        "as root /var/lib/splitclip/pg)",
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="vision tail batch size")
    p.add_argument("--batch-wait-s", type=float, default=None, help="vision tail batch wait in seconds")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--once", action="store_true", help="exit once the service is up (for smoke tests)")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cloud_service import launch
    from cloud_service.embedded_redis import EmbeddedRedis
    from cloud_service.settings import CloudSettings
    from splitclip.bundle import load_bundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # flags > SPLITCLIP_* > defaults; the deployments load the same settings again (plus the config's args)
    settings = CloudSettings.load(
        {
            "bundle": args.bundle,
            "redis_url": args.redis_url,
            "grpc_port": args.port,
            "search": args.search,
            "pg_url": args.pg_url,
        }
    )
    if not settings.bundle:
        print("error: --bundle (or SPLITCLIP_BUNDLE) is required", file=sys.stderr)
        return 2
    bundle_dir = Path(settings.bundle).resolve()
    bundle = load_bundle(bundle_dir)  # fail here, with a clear message, rather than in a replica

    config = launch.load_config(args.config)  # a missing or unparsable file: before anything starts
    embedded = pg = None
    try:  # from the first thing started: a bad config, a failed deploy or Ctrl-C stop what is up
        redis_url = settings.redis_url
        if not redis_url:
            embedded = EmbeddedRedis().start()
            redis_url = embedded.url
            print(f"splitclip cloud: embedded Valkey at {redis_url}", flush=True)
        if settings.search:
            if not settings.pg_url:
                pg = start_embedded_pg(args.pg_data_dir)
                print(f"splitclip cloud: embedded PostgreSQL in {pg.data_dir}", flush=True)
            # The replicas read SPLITCLIP_PG_URL from their environment, which the local Ray started
            # below inherits from this process (as launch.SERVE_ENV): a password in --pg-url never
            # goes into the Serve config, which `serve status` and the dashboard show.
            os.environ["SPLITCLIP_PG_URL"] = pg.url if pg is not None else settings.pg_url
        grpc_port = settings.grpc_port or None  # 0: the Serve config's port
        cfg = serve_config(config, args, bundle_dir, redis_url, search=settings.search, grpc_port=grpc_port)
        port = cfg["grpc_options"]["port"]
        print(f"splitclip cloud: starting Ray and Serve for bundle {bundle.id} ...", flush=True)
        launch.init_ray(args.num_cpus)
        launch.deploy(cfg)
        print(
            f"splitclip cloud: gRPC on 127.0.0.1:{port} (service splitclip.v1.SplitClip, "
            f"application '{cfg['applications'][0]['name']}', bundle {bundle.id}); Ctrl-C stops",
            flush=True,
        )
        if not args.once:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
    finally:
        print("splitclip cloud: shutting down", flush=True)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if embedded is not None:
            embedded.stop()
        if pg is not None:
            pg.stop()
    return 0


def serve_config(
    config: dict[str, Any],
    args: argparse.Namespace,
    bundle_dir: Path,
    redis_url: str,
    *,
    search: bool,
    grpc_port: int | None,
) -> dict[str, Any]:
    """The Serve config with this run's application args: never a PostgreSQL URL (the replicas'
    environment carries it) nor the token (CloudSettings.as_args). `grpc_port` None: the config's."""
    from cloud_service import launch

    return launch.with_overrides(
        config,
        args={
            "bundle": str(bundle_dir),
            "redis_url": redis_url,
            "max_batch_size": args.max_batch_size,
            "batch_wait_s": args.batch_wait_s,
            "search": True if search else None,
        },
        grpc_port=grpc_port,
        http_port=args.http_port,
    )


def start_embedded_pg(data_dir: Path | None):  # -> EmbeddedPostgres
    """The embedded PostgreSQL of `--search` without a URL, migrated once here (the replicas migrate
    again on connect, a no-op then)."""
    from cloud_service.search import open_store
    from cloud_service.search.embedded_pg import EmbeddedPostgres
    from cloud_service.search.settings import SearchSettings

    pg = EmbeddedPostgres(data_dir or SearchSettings.load().pg_data_dir).start()
    try:
        store, _ = open_store(SearchSettings.load({"pg_url": pg.url}))
        store.close()
    except BaseException:
        pg.stop()
        raise
    return pg


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="splitclip cloud")
    build_parser(_p)
    raise SystemExit(run(_p.parse_args()))
