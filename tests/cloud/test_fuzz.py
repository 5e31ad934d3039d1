"""Bad input over the real gRPC API: a hypothesis fuzzer through Serve's gRPC proxy (one local Ray for
the module: conftest.cloud's, with fleet search on against a real embedded PostgreSQL), over a raw channel (tests/cloud/fuzzkit.py: the requests, the expected
statuses, the strategies).

Each case must get the status docs/cloud.md defines for it, with details, and an OK answer must be a
sound one (one finite probability per label, summing to 1). Bytes that do not parse as the method's
message are INVALID_ARGUMENT (cloud_service.lenient); UNKNOWN and INTERNAL are never right. After each
batch (test) a grpc.health.v1 Check must say SERVING and a good Classify must still be answered.
Derandomized: the same cases every run. `-s` prints the inputs tried per category and the statuses.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_service.grpc_api import pb
from cloud_service.health import CHECK_METHOD, SERVING, HealthCheckResponse
from splitclip import codec
from splitclip.codec.frame import frame as framed  # header + body, body_len and crc32 filled in
from splitclip.runtime import BundleRuntime
from tests.cloud.conftest import TOKEN, Cloud
from tests.cloud.fuzzkit import (
    BAD_UTF8,
    EDGE_U32,
    EXTREMES,
    FIELD_MAX,
    FUZZ,
    HEADER_FIELDS,
    METHODS,
    SEEN,
    STRING_FIELDS,
    TRIED,
    Api,
    C,
    apply_frame_changes,
    apply_search_changes,
    apply_upload_changes,
    byte_mutations,
    frame_changes,
    length_delimited,
    mutate_bytes,
    odd_text,
    other_changes,
    search_changes,
    stream_items,
    upload_changes,
)
from tests.conftest import pg_base_dir


@pytest.fixture(scope="module")
def cloud(tiny_bundle_dir: Path, redis_server):
    """conftest.cloud's service and arguments, with fleet search on (Search / Upload validate for real)."""
    import ray
    from ray import serve

    from cloud_service import launch
    from cloud_service.search.embedded_pg import EmbeddedPostgres
    from splitclip.procs import free_port

    base = pg_base_dir("splitclip-fuzz-pg-")
    pg = EmbeddedPostgres(base / "data").start()
    launch.init_ray(2, log_to_driver=False)
    try:
        grpc_port = free_port()
        args = {
            "bundle": str(tiny_bundle_dir.resolve()), "redis_url": redis_server.url, "max_batch_size": 16,
            "batch_wait_s": 0.02, "max_payload_bytes": 256 * 1024, "redis_retry_s": 0.2, "redis_timeout_s": 2.0,
            "max_prompts": 8, "max_prompt_chars": 60, "search": True, "pg_url": pg.url,
        }  # fmt: skip
        cfg = launch.with_overrides(launch.load_config(), args=args, grpc_port=grpc_port, http_port=free_port(),
                                    env={"SPLITCLIP_NODE_TOKEN": TOKEN})  # fmt: skip
        launch.deploy(cfg)
        yield Cloud(f"127.0.0.1:{grpc_port}", tiny_bundle_dir, redis_server, TOKEN)
    finally:
        serve.shutdown()
        ray.shutdown()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def api(cloud):
    a = Api(cloud.address, cloud.token, BundleRuntime(cloud.bundle_dir))
    a.register_prompt_set()
    yield a
    a.channel.close()
    per = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
    seen = ", ".join(f"{k} {v}" for k, v in SEEN.most_common())
    print(f"\nfuzz: {sum(TRIED.values())} bad inputs tried ({per}); statuses: {seen}")


# -- the cases ---------------------------------------------------------------------------------------


def test_raw_bytes_and_mutated_protos_get_their_status(api):
    @settings(FUZZ, max_examples=200)
    @given(method=st.sampled_from(sorted(METHODS)), how=byte_mutations)
    def case(method: str, how: tuple[str, object]) -> None:
        raw = mutate_bytes(api.good_requests[method].SerializeToString(), how)
        api.check(f"raw-{how[0]}", method, raw, api.call(method, raw))

    case()
    api.still_serving()


def test_invalid_utf8_in_string_fields_is_invalid_argument(api):
    @settings(FUZZ, max_examples=60)
    @given(
        where=st.sampled_from([(m, n) for m, ns in sorted(STRING_FIELDS.items()) for n in ns]),
        text=st.tuples(odd_text, st.sampled_from(BAD_UTF8), odd_text),
    )
    def case(where: tuple[str, int], text: tuple[str, bytes, str]) -> None:
        method, field = where
        value = text[0].encode() + text[1] + text[2].encode()
        raw = api.good_requests[method].SerializeToString() + length_delimited(field, value)
        assert api.expect(method, raw) == C.INVALID_ARGUMENT  # protobuf refuses it here too
        api.check("utf8", method, raw, api.call(method, raw))

    case()
    api.still_serving()


def test_frames_with_bad_fields_get_their_status(api):
    @settings(FUZZ, max_examples=200)
    @given(cut=st.integers(0, 8), changes=st.lists(frame_changes, min_size=1, max_size=3))
    def case(cut: int, changes: list[tuple[str, object]]) -> None:
        f = apply_frame_changes(api, api.good[cut % (api.L + 1)], changes)
        raw = f.SerializeToString()
        api.check("frame-fields", "Classify", raw, api.call("Classify", raw))

    case()
    api.still_serving()


def test_payload_headers_with_wrong_shapes_dtypes_and_ids_get_their_status(api):
    """Every header field set to an edge or random value (huge dims such as 2**31 tokens, unknown dtype,
    kind, flags and preset ids), with body_len and crc32 still right, so the field itself is judged."""

    @settings(FUZZ, max_examples=150)
    @given(
        cut=st.integers(0, 8),
        preset=st.sampled_from(["lossless", "fp16", "int8-prune50-zstd", "pca25-int4-zstd", "klt-q20-ans"]),
        field=st.sampled_from(HEADER_FIELDS),
        value=st.one_of(EDGE_U32, st.integers(0, 2**32 - 1)),
    )
    def case(cut: int, preset: str, field: str, value: int) -> None:
        k = cut % (api.L + 1)
        good = api.payload(k, preset if k else "png")
        h = codec.read_header(good)
        payload = framed(
            replace(h, **{field: value % (FIELD_MAX.get(field, 2**32 - 1) + 1)}), good[codec.HEADER_SIZE :]
        )
        f = pb.Frame()
        f.CopyFrom(api.good[k])
        f.payload = payload
        raw = f.SerializeToString()
        api.check("payload-header", "Classify", raw, api.call("Classify", raw))

    case()
    api.still_serving()


def test_non_finite_and_extreme_values_get_their_status(api):
    """fp32 tensors (cut >= 1, `lossless`) with NaN, Inf or extreme finite values at random places."""

    @settings(FUZZ, max_examples=80)
    @given(
        cut=st.integers(1, 8),
        values=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(EXTREMES)), min_size=1, max_size=6),
    )
    def case(cut: int, values: list[tuple[int, float]]) -> None:
        k = 1 + cut % api.L
        good = api.payload(k)
        h = codec.read_header(good)
        assert (h.dtype, h.flags) == (codec.DT_FP32, 0)  # a raw float32 body
        body = np.frombuffer(good, dtype="<f4", offset=codec.HEADER_SIZE).copy()
        for i, v in values:
            body[i % body.size] = v
        f = pb.Frame()
        f.CopyFrom(api.good[k])
        f.payload = framed(h, body.tobytes())
        raw = f.SerializeToString()
        api.check("values", "Classify", raw, api.call("Classify", raw))

    case()
    api.still_serving()


def test_regression_tensors_the_model_cannot_normalise_are_invalid_argument(api):
    """Found by the fuzzer: finite values that overflow the tail (3.4e38 in a hidden state) or the
    normalisation (an all-zero embedding at cut L) were answered OK with NaN probabilities."""
    for k, values in ((1, 3.4e38), (api.L, 0.0)):
        good = api.payload(k)
        h = codec.read_header(good)
        body = np.full((len(good) - codec.HEADER_SIZE) // 4, values, dtype="<f4")
        f = pb.Frame()
        f.CopyFrom(api.good[k])
        f.payload = framed(h, body.tobytes())
        raw = f.SerializeToString()
        got = api.call("Classify", raw)
        assert got.code == C.INVALID_ARGUMENT and "no usable image embedding" in got.details, got
        api.check("values", "Classify", raw, got)
    api.still_serving()


def test_text_hello_and_check_requests_with_bad_fields_get_their_status(api):
    @settings(FUZZ, max_examples=120)
    @given(recipe=other_changes)
    def case(recipe: tuple[str, list[tuple[str, object]]]) -> None:
        method, changes = recipe
        msg = type(api.good_requests[method])()
        msg.CopyFrom(api.good_requests[method])
        for name, value in changes:
            if isinstance(value, list):
                msg.ClearField(name)
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        raw = msg.SerializeToString()
        api.check(f"{method}-fields", method, raw, api.call(method, raw))

    case()
    api.still_serving()


def test_search_and_upload_requests_with_bad_fields_get_their_status(api):
    """Search: text and image together or neither, bad templates, images that are no image file (or too
    big), k beyond 1000, too many or odd node filters, NaN / negative / crossed times. Upload: missing or
    odd ids, embeddings of the wrong size, not unit, NaN, frame ids beyond bigint, odd times and labels.
    OK answers are checked too: hits within their filters, best first; stored + duplicates = frames."""
    assert api.call("Upload", api.good_requests["Upload"].SerializeToString()).code == C.OK  # rows to find

    @settings(FUZZ, max_examples=120)
    @given(method=st.sampled_from(["Search", "Upload"]), data=st.data())
    def case(method: str, data: st.DataObject) -> None:
        if method == "Search":
            msg = apply_search_changes(api, data.draw(search_changes))
        else:
            msg = apply_upload_changes(api, data.draw(upload_changes))
        raw = msg.SerializeToString()
        api.check(f"{method}-fields", method, raw, api.call(method, raw))

    case()
    good = api.call(
        "Search", pb.SearchRequest(text="a cat", node_ids=["fuzz-up"], k=1000).SerializeToString()
    )
    hits = pb.SearchResponse.FromString(good.body).hits if good.code == C.OK else []
    # frame 1 from above, and whatever valid uploads of node fuzz-up the cases stored beside it
    assert good.code == C.OK and 1 in [h.frame_id for h in hits] and {h.node_id for h in hits} == {"fuzz-up"}
    api.still_serving()


def test_a_stream_of_good_and_bad_frames_answers_each_frame_once(api):
    """Frames that parse come back once each with their frame_id and expected status; bytes that are no
    Frame come back as one INVALID_ARGUMENT result each, with frame_id 0 (they carry none)."""

    @settings(FUZZ, max_examples=40)
    @given(items=st.lists(stream_items, min_size=1, max_size=10))
    def case(items: list[tuple[str, object]]) -> None:
        raws, sent = [], {}
        for i, (kind, arg) in enumerate(items, start=1):
            if kind == "unparsable":
                raws.append(api.good[api.L].SerializeToString() + length_delimited(7, arg))  # type: ignore[arg-type]
                continue
            cut, changes = (arg, []) if kind == "good" else arg  # type: ignore[misc]
            f = apply_frame_changes(api, api.good[cut % (api.L + 1)], changes)
            f.frame_id = i
            sent[i] = f
            raws.append(f.SerializeToString())
        results = api.stream(raws)
        TRIED["stream-frames"] += len(raws)
        assert len(results) == len(raws), f"{len(results)} results for {len(raws)} frames"
        unparsed = [r for r in results if r.frame_id == 0]
        assert len(unparsed) == len(raws) - len(sent)
        assert all(r.error.code == "INVALID_ARGUMENT" and r.error.message for r in unparsed)
        by_id = {r.frame_id: r for r in results if r.frame_id}
        assert sorted(by_id) == sorted(sent)
        for i, f in sent.items():
            want, r = api.expect_Classify(f), by_id[i]
            SEEN[r.error.code or "OK"] += 1
            assert (r.error.code or "OK") == want.name, f"frame {i}: {r.error.code} ({r.error.message})"
            if want == C.OK:
                api.check_result(f, r)

    case()
    api.still_serving()


def test_bytes_that_do_not_parse_without_a_token_are_unauthenticated(api):
    """The token is checked first, as for any request; Check needs none, so it judges the bytes."""
    junk = length_delimited(1, b"\xff")  # a string field 1 with bad UTF-8: no message parses it
    for method in METHODS:
        got = api.call(method, junk, token=False)
        want = C.INVALID_ARGUMENT if method == "Check" else C.UNAUTHENTICATED
        assert got.code == want, (method, got)


def test_lenient_registration_hands_bytes_that_do_not_parse_on_as_unparsed():
    """Without Serve: a plain grpc.aio server with the servicer functions Serve's proxy loads; the
    handler sees an `Unparsed` (not gRPC's UNKNOWN before any handler runs) and a good request as usual."""
    import asyncio

    from cloud_service import grpc_api
    from cloud_service.lenient import Unparsed

    class Echo:
        async def Classify(self, request, context):
            if isinstance(request, Unparsed):
                await context.abort(C.INVALID_ARGUMENT, request.message)
            return pb.Result(frame_id=request.frame_id)

        async def Check(self, request, context):
            return HealthCheckResponse(status=SERVING if not isinstance(request, Unparsed) else 0)

        def __getattr__(self, name):  # the other RPCs are not called here
            return None

    async def scenario() -> None:
        server = grpc.aio.server()
        grpc_api.add_SplitClipServicer_to_server(Echo(), server)
        grpc_api.add_HealthServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                classify = ch.unary_unary(METHODS["Classify"][0])
                assert (
                    pb.Result.FromString(await classify(pb.Frame(frame_id=7).SerializeToString())).frame_id
                    == 7
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await classify(length_delimited(3, b"\xff"))
                assert info.value.code() == C.INVALID_ARGUMENT
                assert "not a valid splitclip.v1.Frame" in (info.value.details() or "")
                check = ch.unary_unary(CHECK_METHOD)
                assert HealthCheckResponse.FromString(await check(b"\x0a\x01\xff")).status == 0
                assert HealthCheckResponse.FromString(await check(b"")).status == SERVING
        finally:
            await server.stop(0)

    asyncio.run(scenario())
