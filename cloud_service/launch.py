"""Deploy deploy/serve_config.yaml on a running Ray, the way `serve run CONFIG` does, with overrides.

Used by `splitclip cloud`, `splitclip bench cloud` and the tests, so that all of them run exactly
the configuration a cluster would (Serve applies the file's per-deployment overrides too).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("splitclip.cloud.launch")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve_config.yaml"

# Ray passes task arguments and results up to this size inside the RPC; bigger ones go through the
# shared-memory object store (a put, a pin and a release per object, CPU in the raylet and both
# workers). The default, 100 KiB, sends every lossless ViT-B/32 frame (50 x 768 fp32 = 154 KB) through
# the store twice (proxy -> ingress, ingress -> tail). The cluster sets the same value with the
# environment variable RAY_max_direct_call_object_size (deploy/k8s/base/rayservice.yaml).
RAY_SYSTEM_CONFIG: dict[str, Any] = {"max_direct_call_object_size": 8 << 20}

# Ray Serve's per-request path, trimmed (the same variables are on the Ray containers in
# deploy/k8s/base/rayservice.yaml; they must reach every Ray process, the proxy included):
SERVE_ENV: dict[str, str] = {
    # run replica code on the replica's own event loop, not on a second thread it hands over to
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # route handle calls (ingress -> tail / scorer) on the caller's loop, not on a router thread
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # buffer the per-request access log instead of a write per request
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    # the proxy reaches the ingress over Serve's gRPC transport instead of Ray actor calls: half the
    # proxy's and the ingress's CPU per frame. Only the proxy hop: with gRPC between deployments too
    # (RAY_SERVE_USE_GRPC_BY_DEFAULT=1) the ingress -> VisionTail calls stall at 32 clients (measured,
    # docs/bench_cloud.md).
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    # that hop's receive limit (gRPC's 4 MiB default) above the largest frame the ingress accepts,
    # so an oversize frame gets the ingress's own RESOURCE_EXHAUSTED naming the limit
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 << 20),
}


# Only for the local, single-box Ray that init_ray starts (`splitclip cloud`, the bench, the tests):
# Serve kills a proxy that is not ready within 5 s three times in a row, and on a loaded 2-core box
# the proxy worker can take longer than that to start (reproduced with 4 CPU hogs: `ActorDiedError:
# ProxyActor ... killed by ray.kill`).
LOCAL_ENV: dict[str, str] = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """`ray.init` for a local cluster with the service's Ray system config and Serve environment
    (anything already set in the environment wins)."""
    import os

    import ray

    for k, v in {**SERVE_ENV, **LOCAL_ENV}.items():
        os.environ.setdefault(k, v)
    system = {k: v for k, v in RAY_SYSTEM_CONFIG.items() if f"RAY_{k}" not in os.environ}
    ray.init(num_cpus=num_cpus, include_dashboard=False, _system_config=system or None, **kwargs)


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"Serve config {p} not found (pass --config)")
    return yaml.safe_load(p.read_text())


def with_overrides(
    config: dict[str, Any],
    *,
    args: dict[str, Any] | None = None,
    grpc_port: int | None = None,
    http_port: int | None = None,
    env: dict[str, str] | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A copy of `config` with the splitclip application's args / env / deployment options changed."""
    cfg = copy.deepcopy(config)
    if grpc_port is not None:
        cfg.setdefault("grpc_options", {})["port"] = grpc_port
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = http_port
    app = cfg["applications"][0]
    if args:
        app["args"] = {**app.get("args", {}), **{k: v for k, v in args.items() if v is not None}}
    if env:
        runtime_env = app.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    for name, opts in (deployments or {}).items():
        entries = app.setdefault("deployments", [])
        entry = next((d for d in entries if d["name"] == name), None)
        if entry is None:
            entries.append({"name": name, **opts})
        else:
            entry.update(opts)
    return cfg


def deploy(config: dict[str, Any], *, timeout_s: float = 180.0) -> None:
    """Start Serve with the config's proxy options and deploy its applications; wait until RUNNING."""
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    _get_global_client().deploy_apps(schema, _blocking=False)
    wait_running([a.name for a in schema.applications], timeout_s=timeout_s)


def wait_running(apps: list[str], *, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        status = serve.status().applications
        states = {name: (status[name].status if name in status else "NOT_STARTED") for name in apps}
        line = ", ".join(f"{n}: {s}" for n, s in states.items())
        if line != last:
            log.info("serve applications: %s", line)
            last = line
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            msgs = "; ".join(f"{n}: {status[n].message}" for n in failed)
            raise RuntimeError(f"Serve deployment failed: {msgs}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications not running after {timeout_s:.0f} s ({line})")
        time.sleep(0.5)


def driver_handle(deployment: str, app: str = "splitclip"):
    """A handle usable from plain (non-async) driver code such as the bench and the tests: its router
    runs on its own loop whatever RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP says (the replicas keep that
    setting; under RAY_SERVE_THROUGHPUT_OPTIMIZED=1 it is off, and a sync `.remote().result()` then fails)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)  # the same object for the same name
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle
