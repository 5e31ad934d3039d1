"""The ingress pipeline without Ray or Serve: its phases, refusals with kinds, and the node registry,
with the tail and the text encoder in-process (TailCore, TextCore) and a real Valkey."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.cloud_client import FrameMaker
from cloud_service import errors
from cloud_service.grpc_api import pb
from cloud_service.pipeline import Backends, Pipeline
from cloud_service.registry import list_nodes
from cloud_service.scoring import score
from cloud_service.settings import CloudSettings
from cloud_service.text_encoder import TextCore
from cloud_service.vision_tail import TailCore
from splitclip.classify import classify_local
from splitclip.constants import ERROR_BUNDLE_MISMATCH, ERROR_IMAGE_UPLOAD_REFUSED
from splitclip.prompts import prompt_set
from splitclip.runtime import BundleRuntime

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red circle"]
TOKEN = "pipeline-token"


@pytest.fixture(scope="module")
def runtime(tiny_bundle_dir: Path) -> BundleRuntime:
    return BundleRuntime(tiny_bundle_dir)


@pytest.fixture(scope="module")
def maker(runtime) -> FrameMaker:
    return FrameMaker(runtime)


def settings(bundle_dir: Path, redis_url: str, **args: object) -> CloudSettings:
    base = {"bundle": str(bundle_dir), "redis_url": redis_url, "max_prompts": 8, "redis_timeout_s": 2.0}
    return CloudSettings.load({**base, **args}, env={"SPLITCLIP_NODE_TOKEN": TOKEN})


def local_pipeline(s: CloudSettings) -> Pipeline:
    """The pipeline with its backends in this process (build it inside the test's event loop)."""
    tail = TailCore(s.bundle, threads=1)
    text = TextCore(s)
    logit_scale = tail.runtime.manifest.logit_scale

    async def embed_many(cuts: list[int], arrays: list[np.ndarray]) -> list:
        return await asyncio.to_thread(tail.run, cuts, arrays)

    async def score_many(items: list, texts: dict) -> list:
        return [score(img, texts[sid], n, logit_scale, k) for img, sid, n, k in items]

    return Pipeline(s, Backends(embed_many, text.encode, score_many))


async def frames_of(frames: list[pb.Frame]) -> AsyncIterator[pb.Frame]:
    for f in frames:
        yield f


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_frames_and_a_stream_are_answered_like_local_inference(tiny_bundle_dir, redis_server, runtime, maker):
    L = runtime.num_blocks
    imgs = [image(i) for i in range(2)]
    local = classify_local(runtime, imgs, prompt_set(PROMPTS))  # [2, n_prompts]

    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        for cut in (0, 1, L):
            r = await p.classify(maker.frame(imgs[0], cut, PROMPTS, frame_id=cut, top_k=2))
            np.testing.assert_allclose(r.probabilities, local[0], atol=1e-4, err_msg=f"cut {cut}")
            assert r.frame_id == cut and len(r.top) == 2 and r.top[0].prompt == PROMPTS[r.top[0].index]
        frames = [maker.frame(imgs[i % 2], 1, PROMPTS, frame_id=10 + i) for i in range(6)]
        frames[3].bundle_id = "b-0000000000000000"
        results = {r.frame_id: r async for r in p.stream(frames_of(frames))}
        assert sorted(results) == [f.frame_id for f in frames]
        bad = results[13].error
        assert (bad.code, bad.kind) == ("FAILED_PRECONDITION", ERROR_BUNDLE_MISMATCH)
        assert "b-0000000000000000" in bad.message and runtime.manifest.bundle_id in bad.message
        for i in (0, 1, 2, 4, 5):
            assert not results[10 + i].error.code
            np.testing.assert_allclose(results[10 + i].probabilities, local[i % 2], atol=1e-4)
        await p.close()

    asyncio.run(scenario())


def test_phases_refuse_with_a_status_and_a_kind(tiny_bundle_dir, redis_server, runtime, maker):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        with pytest.raises(errors.ServiceError) as e:
            p.check_bundle("b-1111111111111111")
        assert (e.value.code, e.value.kind) == (grpc.StatusCode.FAILED_PRECONDITION, ERROR_BUNDLE_MISMATCH)
        assert e.value.to_pb().kind == ERROR_BUNDLE_MISMATCH
        with pytest.raises(errors.ServiceError) as e:
            p.check_bundle("")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and not e.value.kind

        p.authenticate([("x-splitclip-token", TOKEN)])
        p.authenticate([("authorization", f"Bearer {TOKEN}")])
        p.authenticate(None)  # a deployment-handle call: no metadata at all
        for md in ([], [("x-splitclip-token", "wrong")]):
            with pytest.raises(errors.ServiceError) as e:
                p.authenticate(md)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

        good = maker.frame(image(0), 1, PROMPTS)
        bad_cut = pb.Frame()
        bad_cut.CopyFrom(good)
        bad_cut.cut = runtime.num_blocks + 1
        for frame, code in (
            (bad_cut, grpc.StatusCode.INVALID_ARGUMENT),
            (pb.Frame(bundle_id=good.bundle_id, cut=1, payload=good.payload), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.Frame(bundle_id=good.bundle_id, cut=1, payload=good.payload, prompt_set_id="ps-nope"), grpc.StatusCode.NOT_FOUND),
        ):  # fmt: skip
            r = await p.answer(frame)
            assert isinstance(r, errors.ServiceError) and r.code == code, r
        too_many = pb.TextRequest(bundle_id=good.bundle_id, prompts=[f"p{i}" for i in range(9)])
        with pytest.raises(ValueError, match="at most 8"):  # a PromptError: the adapter maps it
            await p.encode_text(too_many)
        await p.close()

    asyncio.run(scenario())


def test_encode_text_then_frames_name_the_prompt_set(tiny_bundle_dir, redis_server, runtime, maker):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        bid = runtime.manifest.bundle_id
        resp = await p.encode_text(
            pb.TextRequest(bundle_id=bid, prompts=PROMPTS, templates=["a {}", "the {}"])
        )
        by_text = await p.classify(maker.frame(image(1), 2, PROMPTS, templates=["a {}", "the {}"]))
        p.clear_memo()  # another replica: the set comes from Redis
        by_id = await p.classify(maker.frame(image(1), 2, prompt_set_id=resp.prompt_set_id))
        np.testing.assert_allclose(by_id.probabilities, by_text.probabilities, atol=1e-6)
        assert [lab.prompt for lab in by_id.top] == [lab.prompt for lab in by_text.top]
        await p.close()

    asyncio.run(scenario())


def test_hello_is_the_heartbeat_of_the_registry(tiny_bundle_dir, redis_server, runtime):
    interval = 0.5  # registry TTL 1.5 s
    node, other = f"n-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    bid = runtime.manifest.bundle_id

    def listed() -> dict[str, object]:
        return {n.node_id: n for n in list_nodes(redis_server.url) if n.node_id in (node, other)}

    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url, heartbeat_interval_s=interval))
        hello = pb.HelloRequest(node_id=node, bundle_id=bid, mode="split", frames_answered=7, cuts=[1])
        resp = await p.hello(hello)
        assert resp.accepted and resp.heartbeat_interval_s == pytest.approx(interval)
        resp = await p.hello(pb.HelloRequest(node_id=other, bundle_id="b-2222222222222222", mode="local"))
        assert not resp.accepted and "b-2222222222222222" in resp.message and bid in resp.message

        n = listed()[node]
        assert (n.bundle_id, n.mode, n.frames_answered, n.accepted, n.cuts) == (bid, "split", 7, True, [1])
        assert 0 <= n.age_s < 1.5 and n.ttl_s == pytest.approx(3 * interval)
        assert not listed()[other].accepted

        # alive for longer than 3 intervals while it keeps saying Hello; the silent one drops out
        t_end = time.monotonic() + 4 * interval
        while time.monotonic() < t_end:
            hello.frames_answered += 1
            await p.hello(hello)
            await asyncio.sleep(interval / 2)
        now = listed()
        assert node in now and other not in now
        assert now[node].frames_answered == hello.frames_answered
        await asyncio.sleep(3 * interval + 0.3)
        assert listed() == {}
        with pytest.raises(errors.ServiceError):
            await p.hello(pb.HelloRequest(bundle_id=bid))  # no node_id
        await p.close()

    asyncio.run(scenario())


def test_a_cloud_that_takes_no_pixels_refuses_cut_0_with_the_reason(tiny_bundle_dir, redis_server, maker):
    """SPLITCLIP_ALLOW_IMAGE_UPLOAD=0: cut-0 frames are FAILED_PRECONDITION with their kind; features pass."""

    async def scenario() -> None:
        s = CloudSettings.load(
            {"bundle": str(tiny_bundle_dir), "redis_url": redis_server.url},
            env={"SPLITCLIP_ALLOW_IMAGE_UPLOAD": "0"},
        )
        assert s.allow_image_upload is False
        p = local_pipeline(s)
        r = await p.answer(maker.frame(image(0), 0, PROMPTS))
        assert isinstance(r, errors.ServiceError)
        assert (r.code, r.kind) == (grpc.StatusCode.FAILED_PRECONDITION, ERROR_IMAGE_UPLOAD_REFUSED)
        assert "does not accept pixels" in r.message and r.to_pb().kind == ERROR_IMAGE_UPLOAD_REFUSED
        ok = await p.answer(maker.frame(image(0), 1, PROMPTS))
        assert not isinstance(ok, errors.ServiceError) and len(ok.probabilities) == len(PROMPTS)
        await p.close()

    asyncio.run(scenario())


def test_hello_reports_the_clouds_tail_ms_per_block_and_queue(tiny_bundle_dir, redis_server, runtime, maker):
    """What the nodes' planners read as the cloud's speed: 0 before any frame, then the moving average
    of the tail's ORT ms ("compute") / blocks run of the frames that had a tail; a cut-L frame (no block) leaves it."""
    L = runtime.num_blocks
    hello = pb.HelloRequest(node_id="speed-test", bundle_id=runtime.manifest.bundle_id, mode="split")

    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        first = await p.hello(hello)
        assert first.tail_ms_per_block == 0 and first.queue_ms == 0
        r = await p.classify(maker.frame(image(0), 1, PROMPTS, frame_id=1))
        t = r.timings_ms
        resp = await p.hello(hello)
        assert 0 < t["compute"] <= t["tail"] - t["queue"] + 1e-3  # ORT alone, inside the tail call
        assert resp.tail_ms_per_block == pytest.approx(t["compute"] / (L - 1), rel=1e-4)
        assert resp.queue_ms == pytest.approx(t["queue"], rel=1e-4, abs=1e-4)
        await p.classify(maker.frame(image(1), L, PROMPTS, frame_id=2))
        assert (await p.hello(hello)).tail_ms_per_block == pytest.approx(resp.tail_ms_per_block)
        await p.close()

    asyncio.run(scenario())
