"""The Search and Upload phases and the frames' indexing, in-process: the pipeline with its backends
in this process (as tests/cloud/test_pipeline.py builds it, tiny bundle, real Valkey) and a real
embedded PostgreSQL. The refusals here are the statuses the RPCs answer with."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from benchmarks.cloud_client import FrameMaker
from cloud_service import errors
from cloud_service.grpc_api import pb
from cloud_service.pipeline import Pipeline
from cloud_service.search.embedded_pg import EmbeddedPostgres
from cloud_service.search.service import SearchService, StoreLink, open_search
from cloud_service.search.store import FrameStore
from cloud_service.settings import SettingsError
from splitclip.constants import ERROR_BUNDLE_MISMATCH, INDEX_MAX_TEXT_CHARS, SEARCH_MAX_K
from splitclip.prompts import average_templates
from splitclip.runtime import BundleRuntime
from tests.cloud.test_pipeline import PROMPTS, image, local_pipeline, settings
from tests.conftest import pg_base_dir

T0 = 1_760_000_000.0
DOWN_URL = "postgresql://postgres@/postgres?host=/nonexistent-splitclip-pg"  # nothing listens there


@pytest.fixture(scope="module")
def runtime(tiny_bundle_dir: Path) -> BundleRuntime:
    return BundleRuntime(tiny_bundle_dir)


@pytest.fixture(scope="module")
def maker(runtime: BundleRuntime) -> FrameMaker:
    return FrameMaker(runtime)


def searching(p: Pipeline, url: str, **args: object) -> SearchService:
    """Search on for `p` against `url`, as the ingress wires it."""
    s = settings(Path(p.s.bundle), p.s.redis_url, search=True, pg_url=url, **args)
    service, p.indexer = open_search(
        s, p.bundle, queue_rows=s.index_queue_rows, batch_rows=s.index_batch_rows
    )
    return service


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def unit_rows(dim: int, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def indexed(
    frame_id: int, emb: np.ndarray, ts: float, labels: list[str], source: str = "cam"
) -> pb.IndexedFrame:
    return pb.IndexedFrame(frame_id=frame_id, captured_at=ts, source=source, labels=labels,
                           embedding=np.ascontiguousarray(emb, "<f4").tobytes())  # fmt: skip


def code_of(exc: pytest.ExceptionInfo[errors.ServiceError]) -> grpc.StatusCode:
    return exc.value.code


def test_frames_sent_with_index_are_stored_with_their_labels_and_embedding(
    tiny_bundle_dir, redis_server, runtime, maker, pg
) -> None:
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        service = searching(p, pg.url)
        assert p.indexer is not None
        imgs = [image(100 + i) for i in range(3)]
        results = []
        for i, im in enumerate(imgs):
            f = maker.frame(im, 1, PROMPTS, frame_id=500 + i, node_id="cam-a", top_k=2, index=True,
                            captured_at=T0 + i, source=("/" + "d" * 400 + "/") * (i == 2) + f"gate-{i}")  # fmt: skip
            results.append(await p.classify(f))
        plain = maker.frame(imgs[0], 1, PROMPTS, frame_id=599, node_id="cam-a")  # no index: not stored
        await p.classify(plain)
        assert p.indexer.wait_idle(30)
        assert p.stats()["index"]["written"] == 3

        # the image search for imgs[1] finds that frame first (same embedding, cut 0 vs cut 1)
        r = await service.search(
            pb.SearchRequest(image=png(imgs[1]), node_ids=["cam-a"]), p.query_text, p.query_image
        )
        assert sorted(h.frame_id for h in r.hits) == [500, 501, 502] and r.hits[0].frame_id == 501
        top = r.hits[0]
        assert (top.node_id, top.source, top.captured_at) == ("cam-a", "gate-1", T0 + 1)
        assert top.score > 0.99 and list(top.labels) == [label.prompt for label in results[1].top]
        long = next(h for h in r.hits if h.frame_id == 502)  # over the limit: cleaned, not lost
        assert len(long.source) == INDEX_MAX_TEXT_CHARS and long.source.endswith("/gate-2")
        assert r.bundle_id == runtime.manifest.bundle_id
        p.indexer.close()
        service.close()
        await p.close()

    asyncio.run(scenario())


def test_a_text_query_is_its_templates_averaged_like_the_frames_prompts(
    tiny_bundle_dir, redis_server, runtime, pg
):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        service = searching(p, pg.url)
        dim = runtime.manifest.embed_dim
        embs = unit_rows(dim, 20, seed=7)
        await service.upload(pb.UploadRequest(node_id="txt", bundle_id=p.bundle_id,
                                              frames=[indexed(i, e, T0, ["x"]) for i, e in enumerate(embs)]))  # fmt: skip
        templates = ["a photo of a {}", "a drawing of a {}"]
        texts, _ = await p.backends.encode_text([t.format("red circle") for t in templates])
        q = average_templates(texts, 2)[0]  # [dim]
        r = await service.search(
            pb.SearchRequest(text="red circle", templates=templates, k=5, node_ids=["txt"]),
            p.query_text,
            p.query_image,
        )
        expected = np.argsort(-(embs @ q))[:5]
        assert [h.frame_id for h in r.hits] == list(expected)
        np.testing.assert_allclose([h.score for h in r.hits], (embs @ q)[expected], atol=1e-4)
        p.indexer.close()
        service.close()
        await p.close()

    asyncio.run(scenario())


def test_search_refuses_bad_requests_with_the_reason(tiny_bundle_dir, redis_server, pg):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        service = searching(p, pg.url)
        ok = png(image(1))
        bad = {
            "both text and image": pb.SearchRequest(text="a cat", image=ok),
            "neither": pb.SearchRequest(),
            "whitespace text": pb.SearchRequest(text="   "),
            "k too big": pb.SearchRequest(text="a cat", k=SEARCH_MAX_K + 1),
            "since after until": pb.SearchRequest(text="a cat", since=T0 + 10, until=T0),
            "nan since": pb.SearchRequest(text="a cat", since=float("nan")),
            "negative until": pb.SearchRequest(text="a cat", until=-1),
            "since beyond timestamps": pb.SearchRequest(text="a cat", since=1e300),  # found by the fuzzer
            "empty node id": pb.SearchRequest(text="a cat", node_ids=["a", ""]),
            "templates with an image": pb.SearchRequest(image=ok, templates=["a photo of a {}"]),
            "not an image": pb.SearchRequest(image=b"GIF89a but not really"),
            "bad template": pb.SearchRequest(text="a cat", templates=["no placeholder"]),
            "NUL label": pb.SearchRequest(text="a cat", label="x\x00"),
        }
        for what, req in bad.items():
            with pytest.raises(errors.ServiceError) as e:
                await service.search(req, p.query_text, p.query_image)
            assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT, what
        with pytest.raises(errors.ServiceError) as e:
            await service.search(pb.SearchRequest(bundle_id="b-0", text="a cat"), p.query_text, p.query_image)
        assert (code_of(e), e.value.kind) == (grpc.StatusCode.FAILED_PRECONDITION, ERROR_BUNDLE_MISMATCH)
        with pytest.raises(errors.ServiceError) as e:
            await service.search(pb.SearchRequest(image=b"x" * (5 << 20)), p.query_text, p.query_image)
        assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
        p.indexer.close()
        service.close()
        await p.close()

    asyncio.run(scenario())


def test_filters_by_node_time_and_label(tiny_bundle_dir, redis_server, runtime, pg):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        service = searching(p, pg.url)
        dim = runtime.manifest.embed_dim
        embs = unit_rows(dim, 12, seed=3)
        for node in ("f-a", "f-b", "f-c"):
            frames = [indexed(i, embs[i], T0 + i, ["cat" if i % 2 else "dog"]) for i in range(12)]
            await service.upload(pb.UploadRequest(node_id=node, bundle_id=p.bundle_id, frames=frames))

        async def hits(**kw: object) -> list[tuple[str, int]]:
            r = await service.search(
                pb.SearchRequest(image=png(image(5)), k=100, **kw), p.query_text, p.query_image
            )
            return sorted((h.node_id, h.frame_id) for h in r.hits)

        assert await hits(node_ids=["f-a", "f-c"]) == sorted(
            (n, i) for n in ("f-a", "f-c") for i in range(12)
        )
        assert await hits(node_ids=["f-b"], since=T0 + 3, until=T0 + 5) == [
            ("f-b", 3),
            ("f-b", 4),
            ("f-b", 5),
        ]
        assert await hits(node_ids=["f-c"], label="cat") == [("f-c", i) for i in range(1, 12, 2)]
        r = await service.search(pb.SearchRequest(image=png(image(5)), k=3, node_ids=["f-a", "f-b", "f-c"]),
                                 p.query_text, p.query_image)  # fmt: skip
        assert len(r.hits) == 3 and [h.score for h in r.hits] == sorted(
            [h.score for h in r.hits], reverse=True
        )
        p.indexer.close()
        service.close()
        await p.close()

    asyncio.run(scenario())


def test_upload_stores_once_and_refuses_bad_frames_by_name(tiny_bundle_dir, redis_server, runtime, pg):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        service = searching(p, pg.url)
        dim = runtime.manifest.embed_dim
        embs = unit_rows(dim, 5, seed=11)
        req = pb.UploadRequest(node_id="up", bundle_id=p.bundle_id,
                               frames=[indexed(i, e, T0 + i, ["cat"]) for i, e in enumerate(embs)])  # fmt: skip
        first = await service.upload(req)
        again = await service.upload(req)
        assert (first.stored, first.duplicates, again.stored, again.duplicates) == (5, 0, 0, 5)
        with FrameStore(pg.url) as store:
            store.migrate()
            assert len(store.search(p.bundle_id, embs[0], k=100, node="up", exact=True)) == 5

        def upload(**frame: object) -> pb.UploadRequest:
            base = {"frame_id": 9, "captured_at": T0, "embedding": embs[0].astype("<f4").tobytes()}
            return pb.UploadRequest(
                node_id="up", bundle_id=p.bundle_id, frames=[pb.IndexedFrame(**{**base, **frame})]
            )

        bad = {
            "short embedding": (upload(embedding=b"\0" * 12), "frames[0] (frame 9): embedding is 12 bytes"),
            "not unit": (upload(embedding=(2 * embs[0]).astype("<f4").tobytes()), "L2-normalised"),
            "nan": (upload(embedding=np.full(dim, np.nan, "<f4").tobytes()), "frames[0] (frame 9)"),
            "frame id": (upload(frame_id=2**63), "frame_id"),
            "time": (upload(captured_at=float("inf")), "captured_at"),
            "NUL source": (upload(source="a\x00b"), "source"),
            "long source": (upload(source="s" * 301), "frames[0] (frame 9): source: 301 characters"),
            "33 labels": (upload(labels=["x"] * 33), "frames[0] (frame 9): labels: 33 given, at most 32"),
            "no node": (pb.UploadRequest(bundle_id=p.bundle_id), "node_id"),
            "no bundle": (pb.UploadRequest(node_id="up"), "bundle_id"),
        }
        for what, (r, needle) in bad.items():
            with pytest.raises(errors.ServiceError) as e:
                await service.upload(r)
            assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.message, what
        with pytest.raises(errors.ServiceError) as e:
            await service.upload(pb.UploadRequest(node_id="up", bundle_id="b-0"))
        assert e.value.kind == ERROR_BUNDLE_MISMATCH
        assert (await service.upload(pb.UploadRequest(node_id="up", bundle_id=p.bundle_id))).stored == 0
        p.indexer.close()
        service.close()
        await p.close()

    asyncio.run(scenario())


def test_a_store_that_is_down_answers_unavailable_and_frames_are_still_answered(
    tiny_bundle_dir, redis_server, runtime, maker
):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        service = searching(p, DOWN_URL, index_queue_rows=1)
        dim = runtime.manifest.embed_dim
        up = pb.UploadRequest(
            node_id="n", bundle_id=p.bundle_id, frames=[indexed(1, unit_rows(dim, 1, 0)[0], T0, [])]
        )
        for call in (
            service.upload(up),
            service.search(pb.SearchRequest(text="a cat"), p.query_text, p.query_image),
        ):
            with pytest.raises(errors.ServiceError) as e:
                await call
            assert (
                code_of(e) == grpc.StatusCode.UNAVAILABLE and "search store is unavailable" in e.value.message
            )
            assert "\n" not in e.value.message
        r = await p.answer(maker.frame(image(1), 1, PROMPTS, frame_id=7, index=True))
        assert isinstance(r, pb.Result) and r.frame_id == 7  # answered although its row cannot be stored
        assert p.indexer is not None and p.indexer.stats()["queued"] == 1
        r = await p.answer(maker.frame(image(2), 1, PROMPTS, frame_id=8, index=True))  # the queue is full
        assert isinstance(r, pb.Result) and r.frame_id == 8
        assert p.stats()["counters"]["index_not_queued"] == 1 and p.indexer.stats()["dropped"] == 1
        p.indexer.close(timeout_s=0.3)  # 1, or 0 if a connect attempt held the row just then
        p.indexer._thread.join(10)
        assert (p.indexer.stats()["dropped"], p.indexer.stats()["queued"]) == (2, 0)
        service.close()
        await p.close()

    asyncio.run(scenario())


def test_search_off_ignores_index_and_search_on_needs_a_url(tiny_bundle_dir, redis_server, maker):
    async def scenario() -> None:
        p = local_pipeline(settings(tiny_bundle_dir, redis_server.url))
        await p.classify(maker.frame(image(1), 1, PROMPTS, index=True))
        assert p.stats()["counters"]["index_ignored"] == 1 and "index" not in p.stats()
        with pytest.raises(SettingsError, match="SPLITCLIP_PG_URL"):
            open_search(
                settings(tiny_bundle_dir, redis_server.url, search=True), p.bundle, queue_rows=1, batch_rows=1
            )
        on = settings(tiny_bundle_dir, redis_server.url, search=True, pg_url=DOWN_URL)
        service, ix = open_search(on, p.bundle, queue_rows=3, batch_rows=2)
        assert (ix.queue_rows, ix.batch_rows) == (3, 2)  # the indexer is sized as asked
        ix.close(timeout_s=0)
        service.close()
        await p.close()

    asyncio.run(scenario())
    with pytest.raises(SettingsError, match="index_queue_rows"):
        settings(tiny_bundle_dir, redis_server.url, index_queue_rows=0)


def test_store_link_reconnects_after_the_store_comes_back(runtime) -> None:
    base = pg_base_dir("splitclip-link-")
    server = EmbeddedPostgres(base / "data").start()
    url, bundle, dim = server.url, runtime.manifest.bundle_id, runtime.manifest.embed_dim
    link = StoreLink(url, bundle, dim)
    try:
        assert asyncio.run(link.call(lambda s: s.count(bundle))) == 0
        server.stop()
        with pytest.raises(errors.ServiceError) as e:
            asyncio.run(link.call(lambda s: s.count(bundle)))
        assert code_of(e) == grpc.StatusCode.UNAVAILABLE
        server = EmbeddedPostgres(base / "data").start()
        assert asyncio.run(link.call(lambda s: s.count(bundle))) == 0
    finally:
        link.close()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_the_ingress_answers_search_and_upload_only_when_search_is_on(tiny_bundle_dir, redis_server, pg):
    """The Ingress class itself, without Serve: its three downstream handles are stand-ins that are never
    called here (Search with search off, Upload, stats need none of them)."""
    from types import SimpleNamespace

    from cloud_service.ingress import Ingress

    handle = SimpleNamespace(stats=SimpleNamespace(remote=None))  # only looked up, never called here
    base = {"bundle": str(tiny_bundle_dir), "redis_url": redis_server.url}

    async def scenario() -> None:
        off = Ingress.func_or_class(handle, handle, handle, base)
        for call in (off.Search(pb.SearchRequest(text="a cat")), off.Upload(pb.UploadRequest())):
            with pytest.raises(errors.ServiceError) as e:
                await call
            assert (
                code_of(e) == grpc.StatusCode.FAILED_PRECONDITION and "SPLITCLIP_SEARCH=1" in e.value.message
            )
        assert "index" not in off.stats()
        await off.pipeline.close()

        on = Ingress.func_or_class(handle, handle, handle, {**base, "search": True, "pg_url": pg.url})
        bundle = on.pipeline.bundle_id
        emb = unit_rows(on.pipeline.bundle.manifest.embed_dim, 1, seed=21)[0]
        up = pb.UploadRequest(node_id="ing", bundle_id=bundle, frames=[indexed(1, emb, T0, ["cat"])])
        r = await on.Upload(up)
        assert (r.stored, r.duplicates) == (1, 0)  # stored through its service
        r = await on.Upload(up)
        assert (r.stored, r.duplicates) == (0, 1)
        assert on.stats()["index"]["queued"] == 0
        closing = on.__del__()  # what Serve calls when the replica stops, and awaits what it returns
        assert asyncio.iscoroutine(closing)  # the blocking close runs in a worker thread, off this loop
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await closing
        ticker.cancel()
        assert ticks >= 1  # the loop ran other tasks during the close
        assert not on.pipeline.indexer._thread.is_alive()  # the indexer is closed
        assert on.__del__() is None  # a second call (Python's finalizer) has nothing left to do
        await on.pipeline.close()

    asyncio.run(scenario())


def test_after_a_failed_connect_calls_are_answered_at_once_for_the_retry_interval(runtime) -> None:
    """A black-holed store: a listening socket that never answers (accepted by the kernel, never by a
    server). The first call waits out its connect timeout; the calls after it within search_retry_s are
    UNAVAILABLE without a connect attempt (none reaches the socket) and without a worker thread."""
    import socket

    from cloud_service.search.settings import SearchSettings

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    hole.setblocking(False)
    url = (
        f"postgresql://postgres@127.0.0.1:{hole.getsockname()[1]}/postgres?connect_timeout=1&sslmode=disable"
    )
    bundle, dim = runtime.manifest.bundle_id, runtime.manifest.embed_dim

    def attempts() -> int:
        n = 0
        while True:
            try:
                conn, _ = hole.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    async def calls(link: StoreLink, n: int) -> list[BaseException | int]:
        return await asyncio.gather(*(link.call(lambda s: s.count(bundle)) for _ in range(n)),
                                    return_exceptions=True)  # fmt: skip

    try:
        link = StoreLink(url, bundle, dim, SearchSettings(search_retry_s=3600.0))
        first = asyncio.run(calls(link, 1))[0]
        assert isinstance(first, errors.ServiceError) and first.code == grpc.StatusCode.UNAVAILABLE
        assert attempts() >= 1
        for e in asyncio.run(calls(link, 20)):
            assert isinstance(e, errors.ServiceError) and e.code == grpc.StatusCode.UNAVAILABLE, e
            assert e.message == first.message and "unavailable, try again later" in e.message
        assert attempts() == 0  # none of the 20 tried to connect
        # retry interval 0: every call tries again (so the count above could have seen them)
        again = StoreLink(url, bundle, dim, SearchSettings(search_retry_s=0.0))
        assert all(isinstance(e, errors.ServiceError) for e in asyncio.run(calls(again, 2)))
        assert attempts() >= 2
    finally:
        hole.close()


def test_a_store_that_refuses_this_cloud_at_connect_is_failed_precondition(runtime, pg) -> None:
    """Server-side faults raised from connect() (a schema newer than the code, the bundle stored with
    another dim) are FAILED_PRECONDITION with their message, not INVALID_ARGUMENT."""
    from psycopg.conninfo import make_conninfo

    bundle, dim = runtime.manifest.bundle_id, runtime.manifest.embed_dim
    with FrameStore(pg.url) as admin:
        admin.migrate()
        admin.ensure_bundle("b-dim-other", dim + 1)
        admin._conn.execute("DROP DATABASE IF EXISTS splitclip_newer")
        admin._conn.execute("CREATE DATABASE splitclip_newer")
    newer = make_conninfo(pg.url, dbname="splitclip_newer")
    with FrameStore(newer) as s:
        s.migrate()
        s._conn.execute(
            "INSERT INTO splitclip_schema_version (version, name) VALUES (9999, 'from the future')"
        )
    for link, needle in (
        (StoreLink(newer, bundle, dim), "schema version(s) [9999]"),
        (StoreLink(pg.url, "b-dim-other", dim), f"stored with dim {dim + 1}, not {dim}"),
    ):
        service = SearchService(link.bundle_id, dim, None, link, max_image_bytes=1 << 20)  # type: ignore[arg-type]
        up = pb.UploadRequest(node_id="n", bundle_id=link.bundle_id,
                              frames=[indexed(1, unit_rows(dim, 1, 0)[0], T0, [])])  # fmt: skip
        with pytest.raises(errors.ServiceError) as e:
            asyncio.run(service.upload(up))
        assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION and needle in e.value.message, e.value
        assert "\n" not in e.value.message
        link.close()
