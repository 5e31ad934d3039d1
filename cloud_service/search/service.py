"""The Search and Upload RPCs as phases: validate, compute the query vector, ask the store.

The query vector comes from the pipeline's own paths (passed in as callables, so that this module
needs neither Serve nor the pipeline): a text through the prompt resolver and the text encoder, its
templates averaged and renormalised (splitclip.prompts.average_templates, as frames are scored); an
image file decoded with pillow to uint8 [S, S, 3] at the bundle's input size (splitclip.preprocess)
and run through the VisionTail at cut 0, the same `embed_many` backend frames use.

The store is blocking (psycopg): every call runs in a worker thread on a `StoreLink`, a FrameStore
of its own (the indexer's writer has another connection), connected on first use and again after it
was lost. Store down: UNAVAILABLE with one line, so that a node keeps its journal and retries; after a
failed connect, at once for `search_retry_s` (StoreLink). A store that refuses this cloud at connect
(a schema newer than the code, the bundle stored with another dim): FAILED_PRECONDITION.
Upload writes synchronously (the node deletes its journal rows only after an OK), idempotent on
(bundle, node, frame): a batch sent twice is stored once (`duplicates`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np
import psycopg
from numpy.typing import NDArray
from PIL import Image

from cloud_service import errors
from cloud_service.grpc_api import pb
from cloud_service.search.ingest import TS_MAX, Indexer, RowError, connect, is_down, upload_row
from cloud_service.search.settings import SearchSettings
from cloud_service.search.store import FrameStore, Hit, Row, StoreError
from cloud_service.settings import CloudSettings, SettingsError
from splitclip.bundle import Bundle
from splitclip.constants import INDEX_MAX_TEXT_CHARS, SEARCH_MAX_K, UPLOAD_MAX_FRAMES
from splitclip.errors import SplitclipError
from splitclip.preprocess import PreprocessConfig, to_model_input
from splitclip.prompts import PromptError

T = TypeVar("T")
Embedding = NDArray[np.float32]
TextEmbed = Callable[[str, Sequence[str]], Awaitable[Embedding]]  # (text, templates) -> [dim], unit
ImageEmbed = Callable[[NDArray[np.uint8]], Awaitable[Embedding]]  # uint8 [S, S, 3] -> [dim], unit

DEFAULT_K = 10
MAX_NODE_FILTERS = 64  # each node filter is one store query (merged), so they are bounded
# the shared limits (splitclip.constants) under the names tests/cloud/fuzzkit.py models them by
MAX_IMAGE_PIXELS = 50_000_000  # a decompression bomb is refused before it is decoded
OFF = "fleet search is off on this cloud (SPLITCLIP_SEARCH=1)"


def decode_image(data: bytes, cfg: PreprocessConfig) -> NDArray[np.uint8]:
    """An image file (JPEG, PNG, WebP, ...) -> uint8 [S, S, 3], resized and cropped as frames are."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise errors.invalid(f"image: {w}x{h} pixels, at most {MAX_IMAGE_PIXELS} allowed")
            im.load()
            return to_model_input(im, cfg)
    except errors.ServiceError:
        raise
    except Exception as e:  # pillow's decoders raise many kinds (OSError, SyntaxError, struct.error, ...)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise errors.invalid(f"image: not a readable image file ({type(e).__name__}: {first})") from e


def text_value(what: str, value: str) -> str:
    if len(value) > INDEX_MAX_TEXT_CHARS:
        raise errors.invalid(f"{what}: {len(value)} characters, at most {INDEX_MAX_TEXT_CHARS} allowed")
    if "\x00" in value:
        raise errors.invalid(f"{what}: must not contain NUL characters")
    return value


def time_value(what: str, value: float) -> float | None:
    """A time filter: None when unset (0), else seconds since the epoch."""
    if not (math.isfinite(value) and 0 <= value < TS_MAX):  # beyond it PostgreSQL's timestamps overflow
        raise errors.invalid(
            f"{what}: must be seconds since the epoch in 0..{TS_MAX:.0f} (0 = unset), got {value}"
        )
    return value or None


class StoreLink:
    """A FrameStore for requests: connected (migrated, bundle registered) on first use and after a loss;
    one call at a time on its connection, each in a worker thread.

    A failed connect is remembered for `search_retry_s`: until then every call is answered at once, in
    the caller's task, with the same refusal (UNAVAILABLE while the store is down; FAILED_PRECONDITION
    when the store refuses this code or bundle: a schema newer than the code, the bundle stored with
    another dim), so that with a black-holed store calls neither queue on the lock behind 5 s connects
    nor take worker threads."""

    def __init__(self, url: str, bundle_id: str, dim: int, settings: SearchSettings | None = None) -> None:
        self.url, self.bundle_id, self.dim, self.settings = url, bundle_id, dim, settings
        self.retry_s = (settings or SearchSettings()).search_retry_s
        self._store: FrameStore | None = None
        self._lock = threading.Lock()
        self._refusal: errors.ServiceError | None = None  # of the last failed connect
        self._retry_at = 0.0  # monotonic time before which that refusal stands

    async def call(self, fn: Callable[[FrameStore], T]) -> T:
        self._fail_fast()
        return await asyncio.to_thread(self._call, fn)

    def _fail_fast(self) -> None:
        refusal = self._refusal
        if refusal is not None and time.monotonic() < self._retry_at:
            raise errors.ServiceError(refusal.code, refusal.message, refusal.kind)

    def _call(self, fn: Callable[[FrameStore], T]) -> T:
        with self._lock:
            self._fail_fast()  # a connect that failed while this call waited for the lock
            if self._store is None:
                self._store = self._connect()
            try:
                return fn(self._store)
            except Exception as e:
                if not is_down(e):
                    raise
                self._drop()
                raise unavailable(e) from e

    def _connect(self) -> FrameStore:
        try:
            store = connect(self.url, self.bundle_id, self.dim, self.settings)
        except Exception as e:
            if is_down(e):
                refusal = unavailable(e)
            elif isinstance(e, SplitclipError | psycopg.Error):
                # the server refuses this code or bundle (MigrationError: a newer schema; StoreError: the
                # bundle stored with another dim; no pgvector): no request can fix it
                refusal = errors.precondition(f"the search store cannot serve this cloud: {_first(e)}")
            else:
                raise
            self._refusal, self._retry_at = refusal, time.monotonic() + self.retry_s
            raise refusal from e
        self._refusal = None
        return store

    def _drop(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):  # already broken
                self._store.close()
            self._store = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _first(e: BaseException) -> str:
    """The first line of `e`'s message (its type when it has none), for one-line statuses."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def unavailable(e: BaseException) -> errors.ServiceError:
    return errors.unavailable(f"the search store is unavailable, try again later ({_first(e)})")


class SearchService:
    def __init__(
        self, bundle_id: str, dim: int, preprocess: PreprocessConfig, link: StoreLink, *, max_image_bytes: int
    ) -> None:
        self.bundle_id, self.dim, self.cfg, self.link = bundle_id, dim, preprocess, link
        self.max_image_bytes = max_image_bytes

    # -- Search ------------------------------------------------------------------------------
    async def search(
        self, request: pb.SearchRequest, text_embed: TextEmbed, image_embed: ImageEmbed
    ) -> pb.SearchResponse:
        k, nodes, since, until, label = self.check_search(request)
        query = await self.query_vector(request, text_embed, image_embed)

        def run(store: FrameStore) -> list[Hit]:
            hits: list[Hit] = []
            for node in nodes or [None]:  # each node's k best, merged: the k best of them all
                hits += store.search(
                    self.bundle_id, query, k, node=node, since=since, until=until, label=label
                )
            return sorted(hits, key=lambda h: -h.score)[:k]

        hits = await self._store(run)
        return pb.SearchResponse(
            bundle_id=self.bundle_id,
            hits=[
                pb.SearchHit(
                    node_id=h.node_id,
                    frame_id=h.frame_id,
                    captured_at=h.ts,
                    source=h.source,
                    score=h.score,
                    labels=list(h.labels),
                )
                for h in hits
            ],
        )

    def check_search(
        self, r: pb.SearchRequest
    ) -> tuple[int, list[str], float | None, float | None, str | None]:
        """(k, node filters, since, until, label), or INVALID_ARGUMENT / the bundle-mismatch refusal."""
        if r.bundle_id and r.bundle_id != self.bundle_id:
            raise errors.bundle_mismatch(r.bundle_id, self.bundle_id)
        if bool(r.text.strip()) == bool(r.image):
            raise errors.invalid("send exactly one of text and image")
        if r.image and r.templates:
            raise errors.invalid("templates apply to a text query only")
        if len(r.image) > self.max_image_bytes:
            raise errors.too_large(f"image: {len(r.image)} bytes, at most {self.max_image_bytes} allowed")
        k = r.k or DEFAULT_K
        if not 1 <= k <= SEARCH_MAX_K:
            raise errors.invalid(f"k: must be in 1..{SEARCH_MAX_K} (0 = {DEFAULT_K}), got {k}")
        if len(r.node_ids) > MAX_NODE_FILTERS:
            raise errors.invalid(f"node_ids: {len(r.node_ids)} given, at most {MAX_NODE_FILTERS} allowed")
        nodes = list(dict.fromkeys(text_value(f"node_ids[{i}]", n) for i, n in enumerate(r.node_ids)))
        if "" in nodes:
            raise errors.invalid("node_ids: an empty node id")
        since, until = time_value("since", r.since), time_value("until", r.until)
        if since is not None and until is not None and since > until:
            raise errors.invalid(f"since ({since}) is after until ({until})")
        return k, nodes, since, until, text_value("label", r.label) or None

    async def query_vector(
        self, r: pb.SearchRequest, text_embed: TextEmbed, image_embed: ImageEmbed
    ) -> Embedding:
        if r.text.strip():
            try:
                q = await text_embed(r.text, list(r.templates))
            except PromptError as e:  # too long, a bad template: the same rules as frames' prompts
                raise errors.invalid(str(e)) from e
        else:
            pixels = await asyncio.to_thread(decode_image, r.image, self.cfg)  # uint8 [S, S, 3]
            q = await image_embed(pixels)
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        n = float(np.linalg.norm(q.astype(np.float64)))
        if q.shape != (self.dim,) or not math.isfinite(n) or abs(n - 1.0) > 1e-3:
            raise errors.invalid("the query gives no usable embedding (an all-zero or non-finite vector)")
        return q

    # -- Upload ------------------------------------------------------------------------------
    async def upload(self, request: pb.UploadRequest) -> pb.UploadResponse:
        rows = self.upload_rows(request)
        stored = await self._store(lambda store: store.write(rows)) if rows else 0
        return pb.UploadResponse(stored=stored, duplicates=len(rows) - stored)

    def upload_rows(self, r: pb.UploadRequest) -> list[Row]:
        """The rows of an Upload (ingest.upload_row: the frames' own rules), or INVALID_ARGUMENT naming
        the first frame the store would refuse; nothing of a refused call is stored."""
        if not r.node_id:
            raise errors.invalid("node_id is required")
        node = text_value("node_id", r.node_id)
        if not r.bundle_id:
            raise errors.invalid("bundle_id is required (the id of the bundle the node runs)")
        if r.bundle_id != self.bundle_id:
            raise errors.bundle_mismatch(r.bundle_id, self.bundle_id)
        if len(r.frames) > UPLOAD_MAX_FRAMES:
            raise errors.invalid(f"frames: {len(r.frames)} given, at most {UPLOAD_MAX_FRAMES} per call")
        now = time.time()
        rows = []
        for i, f in enumerate(r.frames):
            try:
                rows.append(upload_row(self.bundle_id, node, f, self.dim, now))
            except RowError as e:
                raise errors.invalid(f"frames[{i}] (frame {f.frame_id}): {e}") from e
        return rows

    async def _store(self, fn: Callable[[FrameStore], T]) -> T:
        try:
            return await self.link.call(fn)
        except StoreError as e:  # a request the store refuses (validated above, so not expected);
            # the store's own faults at connect are FAILED_PRECONDITION / UNAVAILABLE (StoreLink)
            raise errors.invalid(f"the search store refused the request: {e}") from e

    def close(self) -> None:
        self.link.close()


def open_search(
    s: CloudSettings, bundle: Bundle, *, queue_rows: int, batch_rows: int
) -> tuple[SearchService, Indexer]:
    """The Search/Upload service and the frames' indexer of an ingress replica (`s.search` on), the
    indexer holding `queue_rows` rows and writing `batch_rows` per COPY (the ingress passes
    index_queue_rows / index_batch_rows). Nothing connects here: both reach the store on first use,
    so that a replica starts while it is down."""
    if not s.pg_url:
        raise SettingsError(
            "search is on but pg_url is empty: set SPLITCLIP_PG_URL (`splitclip cloud --search` starts an "
            "embedded PostgreSQL and passes its URL)"
        )
    settings = SearchSettings.load({"pg_url": s.pg_url})
    bundle_id, dim = bundle.manifest.bundle_id, bundle.manifest.embed_dim
    indexer = Indexer(
        s.pg_url,
        bundle_id,
        dim,
        settings=settings,
        queue_rows=queue_rows,
        batch_rows=batch_rows,
    )
    cfg = PreprocessConfig.from_dict(bundle.read_json("preprocess.json"))
    link = StoreLink(s.pg_url, bundle_id, dim, settings)
    return SearchService(bundle_id, dim, cfg, link, max_image_bytes=s.max_payload_bytes), indexer
