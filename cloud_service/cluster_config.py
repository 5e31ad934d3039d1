"""The local cluster's configuration: its Serve config overrides and the environment of its Ray processes.

Used by cloud_service/cluster.py (`splitclip cluster`); nothing here starts anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cloud_service.launch import LOCAL_ENV, RAY_SYSTEM_CONFIG, SERVE_ENV, with_overrides

DEFAULT_DIR = Path.home() / ".cache" / "splitclip" / "cluster"
HEAD_RESOURCE = "splitclip_head"
WORKER_RESOURCE = "splitclip_worker"
APP = "splitclip"

# A SIGKILLed node must be declared dead in seconds, not Ray's ~30 s default (GCS health checks of the
# raylets), so that Serve replaces its replicas while the edges are still streaming.
NODE_DEATH_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def cluster_overrides(grpc_port: int, http_port: int) -> dict[str, Any]:
    """with_overrides() keyword arguments that make deploy/serve_config.yaml fit this cluster."""
    on_head = {"resources": {HEAD_RESOURCE: 0.01}}
    return {
        "grpc_port": grpc_port,
        "http_port": http_port,
        "deployments": {
            "Ingress": {"ray_actor_options": on_head},
            "TextEncoder": {"ray_actor_options": on_head},
            "Scorer": {"ray_actor_options": on_head},
            "VisionTail": {"ray_actor_options": {"resources": {WORKER_RESOURCE: 0.01}}},
        },
    }


def render_config(
    base: dict[str, Any], grpc_port: int, http_port: int, extra: dict[str, dict[str, Any]] | None = None,
    app_args: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The Serve config deployed on the cluster: `base` + cluster_overrides + `extra` per deployment
    (merged into the deployment's options, ray_actor_options and autoscaling_config one level deep)."""
    ov = cluster_overrides(grpc_port, http_port)
    deployments: dict[str, dict[str, Any]] = ov.pop("deployments")
    entries = {d["name"]: d for d in base["applications"][0].get("deployments", [])}
    for name, opts in (extra or {}).items():
        merged = {**entries.get(name, {}), **deployments.get(name, {})}
        for k, v in opts.items():
            merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
        merged.pop("name", None)
        deployments[name] = merged
    for name, opts in deployments.items():  # keep the file's other ray_actor_options
        old = entries.get(name, {}).get("ray_actor_options", {})
        opts["ray_actor_options"] = {**old, **opts.get("ray_actor_options", {})}
    cfg = with_overrides(base, args=app_args, deployments=deployments, **ov)
    cfg["proxy_location"] = "HeadOnly"  # one host: proxies on every node would share its ports
    cfg["http_options"]["host"] = "127.0.0.1"
    return cfg


def ray_env(bundle: Path, redis_url: str, token_path: Path) -> dict[str, str]:
    """The environment of every `ray start`: ours (SPLITCLIP_NODE_TOKEN etc. pass through) + the service's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    # Ray's token authentication with a token of this cluster's own (not the user's ~/.ray/auth_token,
    # which other Rays on the machine share)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    for k, v in {**SERVE_ENV, **LOCAL_ENV, **NODE_DEATH_ENV}.items():
        env.setdefault(k, v)
    for k, v in RAY_SYSTEM_CONFIG.items():
        env.setdefault(f"RAY_{k}", str(v))
    env["SPLITCLIP_BUNDLE"] = str(bundle)
    env["SPLITCLIP_REDIS_URL"] = redis_url
    # replicas import cloud_service from this checkout even where it is not installed
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
