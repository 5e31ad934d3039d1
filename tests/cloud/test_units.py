"""Cloud pieces without Ray: settings, scoring math, the tail's shape grouping, the Redis store's
degradation against a real Valkey, the token check, and the deploy manifests (offline schema check)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cloud_service.auth import token_from_metadata
from cloud_service.cache import PromptCache, RedisStore, prompt_key
from cloud_service.scoring import score
from cloud_service.settings import CloudSettings, SettingsError
from splitclip.prompts import PromptSet, average_templates, normalise, zero_shot_probs
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

ROOT = Path(__file__).resolve().parents[2]


# -- settings ----------------------------------------------------------------------------------


def test_settings_layering_and_validation():
    env = {"SPLITCLIP_MAX_BATCH_SIZE": "8", "SPLITCLIP_NODE_TOKEN": "t", "SPLITCLIP_BATCH_WAIT_S": "0.01"}
    s = CloudSettings.load({"max_batch_size": 4}, env=env)
    assert (s.max_batch_size, s.batch_wait_s, s.node_token) == (4, 0.01, "t")  # args > env > default
    assert "node_token" not in s.as_args()
    with pytest.raises(SettingsError, match="max_batch_size"):
        CloudSettings.load({"max_batch_size": 0}, env={})
    with pytest.raises(SettingsError, match="not a valid int"):
        CloudSettings.load(env={"SPLITCLIP_GRPC_PORT": "ninety"})
    with pytest.raises(SettingsError, match="unknown cloud setting 'max_batch'"):
        CloudSettings.load({"max_batch": 3}, env={})
    with pytest.raises(SettingsError, match="SPLITCLIP_NODE_TOKEN only"):
        CloudSettings.load({"node_token": "x"}, env={})


def test_every_cloud_setting_is_read_somewhere():
    """A field nobody reads is a setting that silently does nothing."""
    from dataclasses import fields

    src = "\n".join(f.read_text() for f in (ROOT / "cloud_service").glob("*.py") if f.name != "settings.py")
    unread = [f.name for f in fields(CloudSettings) if not re.search(rf"\.{f.name}\b", src)]
    assert not unread, f"CloudSettings fields read nowhere in cloud_service/: {unread}"


def test_token_from_metadata():
    assert token_from_metadata([("x-splitclip-token", "abc")]) == "abc"
    assert token_from_metadata([("authorization", "Bearer abc ")]) == "abc"
    assert token_from_metadata([("authorization", "Basic abc")]) is None
    assert token_from_metadata([]) is None


# -- scoring -----------------------------------------------------------------------------------


def test_templates_expand_label_major_and_average_renormalises():
    assert PromptSet(("cat", "dog"), ("a {}", "the {} here")).texts() == [
        "a cat",
        "the cat here",
        "a dog",
        "the dog here",
    ]
    assert PromptSet(("cat",)).texts() == ["cat"]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 5)).astype(np.float32)
    avg = average_templates(emb, 3)
    assert avg.shape == (2, 5)
    np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(avg[1], emb[3:].mean(0) / np.linalg.norm(emb[3:].mean(0)), rtol=1e-5)


def test_score_matches_zero_shot_probs_and_orders_top_k():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=8).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    probs, top = score(img, txt, 1, 50.0, 2)
    np.testing.assert_allclose(probs, zero_shot_probs(img[None], txt, 50.0)[0], rtol=1e-6)
    assert [i for i, _ in top] == list(np.argsort(-probs)[:2]) and len(top) == 2


def test_prompt_keys_normalise_whitespace_only():
    assert normalise("  a   photo\tof a cat ") == "a photo of a cat"
    assert prompt_key("b-1", "a  cat") == prompt_key("b-1", "a cat") != prompt_key("b-2", "a cat")
    assert prompt_key("b-1", "A cat") != prompt_key("b-1", "a cat")  # case may matter to a tokenizer
    assert PromptSet(("cat",)).set_id("b-1") != PromptSet(("cat",), ("a {}",)).set_id("b-1")


# -- vision tail grouping ----------------------------------------------------------------------


def test_tail_groups_by_cut_and_tokens_and_isolates_a_bad_frame(tiny_bundle_dir):
    from cloud_service.vision_tail import TailCore

    core = TailCore(str(tiny_bundle_dir), threads=1)
    rt = BundleRuntime(tiny_bundle_dir)
    rng = np.random.default_rng(2)
    tower = Tower(rt)
    pixels = tower.model_input([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)])
    h1 = tower.at_cut(pixels, 1)  # [3, tokens, width]
    h2 = tower.at_cut(pixels, 2)
    want = tower.finish(h1, 1)  # [3, embed_dim]
    pruned = h1[0, :9]  # fewer tokens: its own group
    bad = np.zeros((h1.shape[1], h1.shape[2] + 1), np.float32)  # wrong width: ORT refuses it
    out = core.run([1, 2, 1, 1, 1, 1], [h1[0], h2[1], h1[2], pruned, bad, h1[1]])
    assert isinstance(out[4], Exception)
    emb = {i: o[0] for i, o in enumerate(out) if not isinstance(o, Exception)}
    np.testing.assert_allclose(emb[0], want[0], atol=1e-5)
    np.testing.assert_allclose(emb[1], want[1], atol=1e-5)
    np.testing.assert_allclose(emb[2], want[2], atol=1e-5)
    np.testing.assert_allclose(emb[5], want[1], atol=1e-5)
    assert emb[3].shape == want[0].shape
    # each frame carries its shape group's ORT time: the three full frames at cut 1 share one run
    ms = {i: o[1] for i, o in enumerate(out) if not isinstance(o, Exception)}
    assert all(v > 0 for v in ms.values()) and ms[0] == ms[2] == ms[5]


# -- Redis degradation (real Valkey) -----------------------------------------------------------


def test_redis_store_degrades_and_recovers(redis_server):
    async def scenario() -> None:
        errors: list[str] = []
        # a killed Valkey refuses at once, so generous timeouts cost nothing and survive a stalled box
        store = RedisStore(redis_server.url, timeout_s=1.0, retry_s=1.0, on_error=errors.append)
        cache = PromptCache(store, "b-test", 4, ttl_s=60)
        emb = np.arange(8, dtype=np.float32).reshape(2, 4)
        await cache.put_many(["p one", "p two"], emb)
        got = await cache.get_many(["p one", "p two", "p three"])
        np.testing.assert_array_equal(got[0], emb[0])
        assert got[2] is None and store.available

        redis_server.kill()
        try:
            assert await cache.get_many(["p one"]) == [None]
            assert not store.available and errors
            n = len(errors)
            assert await cache.get_many(["p one"]) == [None]  # within retry_s: Redis not even tried
            assert len(errors) == n
        finally:
            redis_server.start()
        await asyncio.sleep(1.05)
        await cache.put_many(["p one"], emb[:1])
        assert store.available
        np.testing.assert_array_equal((await cache.get_many(["p one"]))[0], emb[0])
        await store.close()

    asyncio.run(scenario())


def test_redis_store_without_url_is_a_no_op():
    store = RedisStore("")
    assert not store.configured and asyncio.run(store.call("get", lambda r: r.get("x"))) is None


# -- the Serve config (the Kubernetes manifests: tests/deploy/test_k8s.py) ----------------------


def test_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app = schema.applications[0]
    assert app.route_prefix == "/" and app.import_path == "cloud_service.app:build"
    assert schema.grpc_options.grpc_servicer_functions == [
        "cloud_service.grpc_api.add_SplitClipServicer_to_server",
        "cloud_service.grpc_api.add_HealthServicer_to_server",
    ]
    CloudSettings.load(app.args, env={})  # every arg is a known setting of the right type


def test_a_payload_limit_above_the_proxy_hop_limit_is_warned_about(monkeypatch, caplog) -> None:
    from cloud_service.ingress import _warn_if_the_proxy_hop_is_smaller

    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "1")
    monkeypatch.setenv("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(4 << 20))
    with caplog.at_level(logging.WARNING, logger="splitclip.cloud.ingress"):
        _warn_if_the_proxy_hop_is_smaller(4 << 20)
        assert "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH" in caplog.text
        caplog.clear()
        _warn_if_the_proxy_hop_is_smaller(1 << 20)
        monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")  # actor calls: no such limit
        _warn_if_the_proxy_hop_is_smaller(64 << 20)
        assert caplog.text == ""


def test_the_vision_tail_takes_its_onnx_runtime_providers_from_a_setting(tiny_bundle_dir) -> None:
    """SPLITCLIP_ORT_PROVIDERS (the prod overlay's CUDA setting) reaches the tail's sessions, in order;
    unset is CPU. (The CPU wheel here also has the Azure provider, which stands in for CUDA.)"""
    from cloud_service.vision_tail import TailCore

    env = {"SPLITCLIP_ORT_PROVIDERS": "AzureExecutionProvider, CPUExecutionProvider"}
    s = CloudSettings.load({"bundle": str(tiny_bundle_dir)}, env=env)
    core = TailCore(s.bundle, 1, providers=s.ort_providers)
    assert core.runtime._providers == ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert TailCore(s.bundle, 1).runtime._providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@splitclip-redis:6379/0", "redis://:***@splitclip-redis:6379/0"),
        ("redis://default:s3cret@h:1", "redis://default:***@h:1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("", ""),
    ],
)
def test_logs_never_show_the_redis_password(url: str, shown: str) -> None:
    """The Kubernetes pods put the Secret's password into SPLITCLIP_REDIS_URL; the logs show the rest."""
    from cloud_service.cache import redacted

    assert redacted(url) == shown


def test_a_redis_outage_warning_hides_the_password(caplog) -> None:
    store = RedisStore("redis://:s3cret@127.0.0.1:1/0", timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="splitclip.cloud"):
        assert asyncio.run(store.call("get", lambda r: r.get("x"))) is None
    assert "unavailable" in caplog.text and "s3cret" not in caplog.text and ":***@127.0.0.1:1" in caplog.text
