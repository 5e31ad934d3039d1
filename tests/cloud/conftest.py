"""Fixtures of the cloud tests: a real Valkey, a real local Ray (one per module) running Serve with
deploy/serve_config.yaml, and a real gRPC client over a socket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitclip.procs import free_port

TOKEN = "test-node-token"


@dataclass
class Cloud:
    address: str
    bundle_dir: Path
    redis: object  # cloud_service.embedded_redis.EmbeddedRedis
    token: str

    def handle(self, deployment: str):
        from cloud_service.launch import driver_handle

        return driver_handle(deployment)

    def stats(self, deployment: str) -> dict:
        return self.handle(deployment).stats.remote().result()


@pytest.fixture(scope="session")
def redis_server():
    from cloud_service.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cloud(tiny_bundle_dir: Path, redis_server) -> Iterator[Cloud]:
    """The whole service on a fresh local Ray (2 CPUs); torn down at the end of the module."""
    import ray
    from ray import serve

    from cloud_service import launch

    launch.init_ray(2, log_to_driver=False)  # with the service's Ray system config
    try:
        grpc_port = free_port()
        cfg = launch.with_overrides(
            launch.load_config(),
            args={
                "bundle": str(tiny_bundle_dir.resolve()),
                "redis_url": redis_server.url,
                "max_batch_size": 16,
                "batch_wait_s": 0.02,  # generous, so that batching is observable on a loaded 2-core box
                "max_payload_bytes": 256 * 1024,
                "redis_retry_s": 0.2,
                "redis_timeout_s": 2.0,  # a stalled box must not count as Redis down (a killed one refuses at once)
                "max_prompts": 8,
                "max_prompt_chars": 60,
            },
            grpc_port=grpc_port,
            http_port=free_port(),
            env={"SPLITCLIP_NODE_TOKEN": TOKEN},
        )
        launch.deploy(cfg)
        yield Cloud(f"127.0.0.1:{grpc_port}", tiny_bundle_dir, redis_server, TOKEN)
    finally:
        serve.shutdown()
        ray.shutdown()
