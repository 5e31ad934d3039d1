"""End to end through the real thing: gRPC client → Serve's gRPC proxy → deployments → Valkey.

One local Ray cluster for the whole module (see conftest.cloud). Tests are ordered: the Redis outage
test comes last because it kills and restarts the shared Valkey.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import redis

from benchmarks.cloud_client import CloudClient, FrameMaker, text_embeddings
from cloud_service.cache import prompt_key
from cloud_service.grpc_api import pb
from cloud_service.registry import NodeRegistry, list_nodes
from splitclip.classify import classify_local
from splitclip.constants import ERROR_BUNDLE_MISMATCH, ERROR_KIND_METADATA_KEY
from splitclip.prompts import average_templates, prompt_set, zero_shot_probs
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red circle", "a blue square"]


@pytest.fixture(scope="module")
def runtime(cloud) -> BundleRuntime:
    return BundleRuntime(cloud.bundle_dir)


@pytest.fixture(scope="module")
def maker(runtime) -> FrameMaker:
    return FrameMaker(runtime)


@pytest.fixture(scope="module")
def client(cloud):
    with CloudClient(cloud.address, token=cloud.token) as c:
        yield c


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 3 * i, 48 + 5 * i, 3), dtype=np.uint8) for i in range(n)]


def fresh_words(n: int) -> list[str]:
    """Prompts nobody asked for yet (the word-level tokenizer maps unknown words to <unk>)."""
    tag = uuid.uuid4().hex[:8]
    return [f"a photo of thing{tag}x{i}" for i in range(n)]


def error_kind(e: grpc.RpcError) -> str | None:
    return dict(e.trailing_metadata() or ()).get(ERROR_KIND_METADATA_KEY)


def rpc_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


# -- correctness -------------------------------------------------------------------------------


def test_split_classification_equals_local_full_inference(cloud, runtime, maker, client):
    L = runtime.num_blocks
    for img in images(2):
        local = classify_local(runtime, [img], prompt_set(PROMPTS))[0]  # [n_prompts]
        for cut in sorted({0, 1, L - 1, L}):
            res = client.classify(maker.frame(img, cut, PROMPTS, frame_id=cut, top_k=2))
            probs = np.array(res.probabilities)
            assert res.frame_id == cut and res.cut == cut and res.bundle_id == runtime.manifest.bundle_id
            np.testing.assert_allclose(probs, local, atol=1e-4, err_msg=f"cut {cut}")
            assert [lab.index for lab in res.top] == list(np.argsort(-local, kind="stable")[:2])
            assert res.top[0].prompt == PROMPTS[res.top[0].index]
            assert {"decode", "tail", "text", "score", "total"} <= set(res.timings_ms)


def test_templates_are_averaged_per_label(runtime, maker, client):
    templates = ["a photo of a {}", "a drawing of a {}"]
    labels = ["cat", "dog", "circle"]
    img = images(1, seed=3)[0]
    res = client.classify(maker.frame(img, 1, labels, templates=templates))
    texts = [t.replace("{}", lab) for lab in labels for t in templates]
    label_emb = average_templates(runtime.encode_text(texts), len(templates))
    want = zero_shot_probs(Tower(runtime).embed_images(img), label_emb, runtime.manifest.logit_scale)[0]
    np.testing.assert_allclose(res.probabilities, want, atol=1e-4)


def test_prompt_set_id_from_encode_text(runtime, maker, client):
    resp = client.encode_text(pb.TextRequest(bundle_id=runtime.manifest.bundle_id, prompts=PROMPTS))
    assert resp.dim == runtime.manifest.embed_dim and resp.prompt_set_id.startswith("ps-")
    np.testing.assert_allclose(text_embeddings(resp), runtime.encode_text(PROMPTS), atol=1e-5)
    img = images(1, seed=5)[0]
    by_id = client.classify(maker.frame(img, 2, prompt_set_id=resp.prompt_set_id))
    by_text = client.classify(maker.frame(img, 2, PROMPTS))
    np.testing.assert_allclose(by_id.probabilities, by_text.probabilities, atol=1e-6)
    assert [lab.prompt for lab in by_id.top] == [lab.prompt for lab in by_text.top]


# -- streaming and batching --------------------------------------------------------------------


def test_stream_answers_every_frame_once_and_batches_within_the_stream(cloud, runtime, maker, client):
    tail = cloud.handle("VisionTail")
    tail.reset_stats.remote().result()
    imgs = images(4, seed=7)
    local = classify_local(runtime, imgs, prompt_set(PROMPTS))  # [4, n_prompts]
    frames = [maker.frame(imgs[i % 4], 1, PROMPTS, frame_id=100 + i) for i in range(48)]
    bad_payload = pb.Frame()
    bad_payload.CopyFrom(frames[5])
    bad_payload.payload = b"garbage" * 10
    frames[5] = bad_payload
    wrong_bundle = pb.Frame()
    wrong_bundle.CopyFrom(frames[9])
    wrong_bundle.bundle_id = "b-0000000000000000"
    frames[9] = wrong_bundle

    results = list(client.stream(frames))

    ids = [r.frame_id for r in results]
    assert sorted(ids) == [f.frame_id for f in frames]  # exactly one result per frame
    by_id = {r.frame_id: r for r in results}
    assert by_id[105].error.code == "INVALID_ARGUMENT" and "header" in by_id[105].error.message
    assert (by_id[109].error.code, by_id[109].error.kind) == ("FAILED_PRECONDITION", ERROR_BUNDLE_MISMATCH)
    assert not by_id[105].error.kind
    for i, f in enumerate(frames):
        if i in (5, 9):
            continue
        r = by_id[f.frame_id]
        assert not r.error.code
        np.testing.assert_allclose(r.probabilities, local[i % 4], atol=1e-4)
    sizes = tail.stats.remote().result()["batch_sizes"]
    assert max(sizes) > 1, f"no batching within one stream: {sizes}"


def test_unary_calls_from_many_clients_are_batched_together(cloud, maker, client):
    tail, ingress = cloud.handle("VisionTail"), cloud.handle("Ingress")
    tail.reset_stats.remote().result()
    ingress.reset_stats.remote().result()
    frames = [maker.frame(img, 2, PROMPTS, frame_id=i) for i, img in enumerate(images(24, seed=11))]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(client.classify, frames))
    assert [r.frame_id for r in results] == list(range(24))
    sizes = tail.stats.remote().result()["batch_sizes"]
    assert max(sizes) > 1, f"concurrent unary calls were not batched: {sizes}"
    # ... and they reached the tail in grouped calls, not one Serve call per frame
    groups = ingress.stats.remote().result()["batch_sizes"]
    assert max(groups) > 1 and sum(groups.values()) < 24, f"one tail call per frame: {groups}"


def test_empty_stream_closes_cleanly(client):
    assert list(client.stream([])) == []


# -- errors ------------------------------------------------------------------------------------


def test_error_statuses(cloud, runtime, maker, client):
    img = images(1)[0]
    good = maker.frame(img, 1, PROMPTS)
    L = runtime.num_blocks

    def frame(**changes) -> pb.Frame:
        f = pb.Frame()
        f.CopyFrom(good)
        for k, v in changes.items():
            if isinstance(v, list):
                f.ClearField(k)
                getattr(f, k).extend(v)
            else:
                setattr(f, k, v)
        return f

    invalid = {
        "malformed payload": frame(payload=good.payload[:-7]),
        "empty payload": frame(payload=b""),
        "cut out of range": frame(cut=L + 1),
        "cut differs from header": frame(cut=2),
        "no prompts": frame(prompts=[]),
        "empty prompt": frame(prompts=["a cat", "   "]),
        "too many prompts": frame(prompts=[f"p{i}" for i in range(9)]),
        "too long prompt": frame(prompts=["x" * 61]),
        "template without {}": frame(templates=["a photo"]),
        "no bundle id": frame(bundle_id=""),
    }
    for what, f in invalid.items():
        e = rpc_error(client.classify, f)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.details())
        assert e.details(), what

    e = rpc_error(client.classify, frame(bundle_id="b-ffffffffffffffff"))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "b-ffffffffffffffff" in e.details() and runtime.manifest.bundle_id in e.details()
    # recognisable by code + a field, through Serve's proxy: the kind in trailing metadata
    assert error_kind(e) == ERROR_BUNDLE_MISMATCH
    assert error_kind(rpc_error(client.classify, frame(cut=L + 1))) is None

    e = rpc_error(client.classify, frame(payload=b"\0" * (256 * 1024 + 1)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "262144" in e.details()
    # past gRPC's 4 MiB default: the proxy -> ingress hop must still let our own check answer
    e = rpc_error(client.classify, frame(payload=b"\0" * (5 << 20)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "262144" in e.details()

    e = rpc_error(client.classify, frame(prompts=[], prompt_set_id="ps-nope"))
    assert e.code() == grpc.StatusCode.NOT_FOUND

    e = rpc_error(client.encode_text, pb.TextRequest(bundle_id=runtime.manifest.bundle_id, prompts=[]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = rpc_error(client.encode_text, pb.TextRequest(bundle_id="b-x", prompts=["a"]))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and error_kind(e) == ERROR_BUNDLE_MISMATCH

    # The replicas survived all of that.
    assert client.classify(good).probabilities


def test_unauthenticated_without_or_with_a_wrong_token(cloud, runtime, maker):
    frame = maker.frame(images(1)[0], 1, PROMPTS)
    hello = pb.HelloRequest(node_id="n1", bundle_id=runtime.manifest.bundle_id)
    for token in (None, "wrong-token"):
        with CloudClient(cloud.address, token=token) as c:
            for call, arg in ((c.classify, frame), (c.hello, hello)):
                e = rpc_error(call, arg)
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.details()
            e = rpc_error(lambda: list(c.stream([frame])))
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.details()
    # `authorization: Bearer` works as well as x-splitclip-token.
    with CloudClient(cloud.address) as c:
        res = c.stub.Classify(frame, metadata=[("authorization", f"Bearer {cloud.token}")])
        assert res.probabilities


# -- registry and cache ------------------------------------------------------------------------


def test_hello_registers_the_node_with_a_ttl(cloud, runtime, client):
    bid = runtime.manifest.bundle_id
    hello = pb.HelloRequest(
        node_id="cam-7", bundle_id=bid, codecs=["lossless"], cuts=[1, 2], mode="split", frames_answered=41
    )
    resp = client.hello(hello)
    assert resp.accepted and resp.cloud_bundle_id == bid and resp.num_blocks == runtime.num_blocks
    assert resp.heartbeat_interval_s > 0 and "lossless" in resp.codecs
    r = redis.Redis.from_url(cloud.redis.url)
    key = NodeRegistry.key("cam-7")
    assert b'"cuts": [1, 2]' in r.get(key)
    assert 0 < r.ttl(key) <= 3 * resp.heartbeat_interval_s

    resp = client.hello(pb.HelloRequest(node_id="cam-8", bundle_id="b-1111111111111111"))
    assert not resp.accepted
    assert "b-1111111111111111" in resp.message and bid in resp.message

    nodes = {n.node_id: n for n in list_nodes(cloud.redis.url)}
    cam7 = nodes["cam-7"]
    assert (cam7.bundle_id, cam7.mode, cam7.frames_answered, cam7.accepted) == (bid, "split", 41, True)
    assert 0 <= cam7.age_s < 3 * resp.heartbeat_interval_s
    assert nodes["cam-8"].bundle_id == "b-1111111111111111" and not nodes["cam-8"].accepted


def test_prompt_cache_is_hit_on_the_second_request(cloud, runtime, maker, client):
    bid = runtime.manifest.bundle_id
    prompts = fresh_words(3)
    first = client.encode_text(pb.TextRequest(bundle_id=bid, prompts=prompts))
    second = client.encode_text(pb.TextRequest(bundle_id=bid, prompts=prompts))
    assert (first.cache_hits, second.cache_hits) == (0, 3)
    np.testing.assert_array_equal(text_embeddings(first), text_embeddings(second))
    r = redis.Redis.from_url(cloud.redis.url)
    assert all(r.exists(prompt_key(bid, p)) for p in prompts)

    # Frames: a second ingress replica (simulated by clearing this one's memo) finds them in Redis.
    text = cloud.handle("TextEncoder")
    frame_prompts = fresh_words(2)
    client.classify(maker.frame(images(1)[0], 1, frame_prompts))
    before = text.stats.remote().result()["counters"].get("cache_hits.redis", 0)
    cloud.handle("Ingress").clear_memo.remote().result()
    client.classify(maker.frame(images(1)[0], 1, frame_prompts))
    after = text.stats.remote().result()["counters"].get("cache_hits.redis", 0)
    assert after - before == 2


def test_redis_outage_keeps_serving_and_the_cache_comes_back(cloud, runtime, maker, client):
    bid = runtime.manifest.bundle_id
    img = images(1, seed=9)[0]
    cloud.redis.kill()
    try:
        prompts = fresh_words(2)
        for _ in range(2):  # answered, but nothing is cached while Redis is away
            resp = client.encode_text(pb.TextRequest(bundle_id=bid, prompts=prompts))
            assert resp.cache_hits == 0 and resp.dim
        cloud.handle("Ingress").clear_memo.remote().result()
        res = client.classify(maker.frame(img, 1, fresh_words(2)))
        assert len(res.probabilities) == 2
        stats = cloud.stats("TextEncoder")
        assert stats["counters"]["redis_errors"] > 0 and not stats["redis_available"]
        assert client.hello(pb.HelloRequest(node_id="cam-9", bundle_id=bid)).message != "ok"
    finally:
        cloud.redis.start()
    time.sleep(0.5)  # > redis_retry_s: the next request tries Redis again
    prompts = fresh_words(2)
    deadline = time.monotonic() + 10
    while True:
        first = client.encode_text(pb.TextRequest(bundle_id=bid, prompts=prompts))
        second = client.encode_text(pb.TextRequest(bundle_id=bid, prompts=prompts))
        if second.cache_hits == 2 or time.monotonic() > deadline:
            break
        prompts = fresh_words(2)
    assert second.cache_hits == 2, "the cache was not used again after Redis came back"
    assert first.cache_hits == 0
    assert cloud.stats("TextEncoder")["redis_available"]
