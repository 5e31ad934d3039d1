"""The local cluster's Serve config and Ray environment (cloud_service/cluster_config.py), without Ray."""

from __future__ import annotations

from pathlib import Path

from cloud_service import cluster_config as cc
from cloud_service.launch import RAY_SYSTEM_CONFIG, SERVE_ENV, load_config


def _deployments(cfg: dict) -> dict[str, dict]:
    return {d["name"]: d for d in cfg["applications"][0]["deployments"]}


def test_the_rendered_config_places_the_tail_on_workers_and_the_rest_on_the_head() -> None:
    base = load_config()
    extra = {"VisionTail": {"autoscaling_config": {"target_ongoing_requests": 1, "upscale_delay_s": 1}}}
    cfg = cc.render_config(base, 5001, 5002, extra)
    d = _deployments(cfg)
    assert d["VisionTail"]["ray_actor_options"] == {"num_cpus": 1, "resources": {cc.WORKER_RESOURCE: 0.01}}
    auto = d["VisionTail"]["autoscaling_config"]
    base_auto = _deployments(base)["VisionTail"]["autoscaling_config"]
    assert auto == {**base_auto, "target_ongoing_requests": 1, "upscale_delay_s": 1}  # merged, not replaced
    for name in ("Ingress", "TextEncoder", "Scorer"):
        opts = d[name]["ray_actor_options"]
        assert opts["resources"] == {cc.HEAD_RESOURCE: 0.01}, name
        assert opts["num_cpus"] == _deployments(base)[name]["ray_actor_options"]["num_cpus"], name
    assert (cfg["grpc_options"]["port"], cfg["http_options"]["port"]) == (5001, 5002)
    assert cfg["proxy_location"] == "HeadOnly"
    assert cfg["applications"][0]["args"] == base["applications"][0]["args"]
    assert base == load_config(), "the shipped config was modified in place"


def test_every_ray_process_gets_the_service_environment(tmp_path: Path) -> None:
    env = cc.ray_env(tmp_path / "bundle", "redis://127.0.0.1:1/0", tmp_path / "auth_token")
    for k, v in SERVE_ENV.items():
        assert env[k] == v, k
    for k, v in RAY_SYSTEM_CONFIG.items():
        assert env[f"RAY_{k}"] == str(v), k
    assert env["SPLITCLIP_BUNDLE"] == str(tmp_path / "bundle")
    assert env["SPLITCLIP_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")
    assert "RAY_ADDRESS" not in env
