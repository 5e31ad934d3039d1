"""What tests/cloud/test_fuzz.py sends and expects: a raw channel to the API (identity serializers,
bytes in and out), the module's good requests, the status each request should get (`Api.expect`,
from docs/cloud.md's Errors table: the shared package's prompt and codec rules, the fixture's limits,
and whether the tail can give the tensor a unit embedding), checks of OK answers, and hypothesis
strategies that draw recipes (plain data) the tests apply to the good requests."""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, fields

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks.cloud_client import CHANNEL_OPTIONS, FrameMaker, metadata
from cloud_service.grpc_api import pb
from cloud_service.health import CHECK_METHOD, SERVING, HealthCheckRequest, HealthCheckResponse
from cloud_service.search import service as search
from cloud_service.search.ingest import TS_MAX, check_row
from cloud_service.search.store import Row
from splitclip import codec
from splitclip.constants import INDEX_MAX_LABELS, INDEX_MAX_TEXT_CHARS, SEARCH_MAX_K, UPLOAD_MAX_FRAMES
from splitclip.prompts import PromptError, PromptLimits, prompt_set
from splitclip.runtime import BundleRuntime

C = grpc.StatusCode
T0 = 1_760_000_000.0  # captured_at of the uploaded rows (0 = now: later than this, also fine)
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red circle"]
# the fixture's limits (tests/cloud/conftest.py); max_templates is the default
MAX_PAYLOAD = 256 * 1024
LIMITS = PromptLimits(max_prompts=8, max_chars=60, max_templates=16)
METHODS: dict[str, tuple[str, type[Message], type[Message]]] = {
    "Classify": ("/splitclip.v1.SplitClip/Classify", pb.Frame, pb.Result),
    "EncodeText": ("/splitclip.v1.SplitClip/EncodeText", pb.TextRequest, pb.TextResponse),
    "Hello": ("/splitclip.v1.SplitClip/Hello", pb.HelloRequest, pb.HelloResponse),
    "Check": (CHECK_METHOD, HealthCheckRequest, HealthCheckResponse),
    "Search": ("/splitclip.v1.SplitClip/Search", pb.SearchRequest, pb.SearchResponse),
    "Upload": ("/splitclip.v1.SplitClip/Upload", pb.UploadRequest, pb.UploadResponse),
}
STREAM_METHOD = "/splitclip.v1.SplitClip/ClassifyStream"
HEALTHY_SERVICES = ("", "splitclip.v1.SplitClip")
TRIED: Counter[str] = Counter()  # inputs per category
SEEN: Counter[str] = Counter()  # statuses answered
# each test sets max_examples: the module (with its cloud's ~25 s start and stop) stays under a minute
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run (CI reproducible); no example database
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str
    body: bytes


class Api:
    """The raw channel, the module's good requests, and the expected status of any request (the oracle)."""

    def __init__(self, address: str, token: str, runtime: BundleRuntime) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.md = metadata(token)
        self.maker = FrameMaker(runtime)
        self.bid = runtime.manifest.bundle_id
        self.L = runtime.num_blocks
        self.dim = runtime.manifest.embed_dim
        self.known_sets: dict[str, int] = {}  # prompt_set_id -> labels, registered by EncodeText
        self.limits = codec.Limits(max_payload_bytes=MAX_PAYLOAD)
        img = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        self.tensors = {k: self.maker.tensor_at(img, k) for k in range(self.L + 1)}
        self.good = {
            k: pb.Frame(
                node_id="fuzz", frame_id=1, bundle_id=self.bid, cut=k, codec="lossless", prompts=PROMPTS,
                payload=self.payload(k),
            )
            for k in range(self.L + 1)
        }  # fmt: skip
        self.good_requests: dict[str, Message] = {
            "Classify": self.good[self.L],
            "EncodeText": pb.TextRequest(
                node_id="fuzz", bundle_id=self.bid, prompts=PROMPTS, templates=["a {}"]
            ),
            "Hello": pb.HelloRequest(node_id="fuzz-node", bundle_id=self.bid, codecs=["lossless"], cuts=[1]),
            "Check": HealthCheckRequest(service="splitclip.v1.SplitClip"),
            "Search": pb.SearchRequest(text="a red circle", k=5),
            "Upload": pb.UploadRequest(node_id="fuzz-up", bundle_id=self.bid, frames=[
                pb.IndexedFrame(frame_id=1, captured_at=T0, source="fuzz", labels=["cat"], embedding=self.unit_bytes()),
            ]),
        }  # fmt: skip
        self.image = png(img)  # a good image file for Search

    def unit_bytes(self, seed: int = 0) -> bytes:
        x = np.random.default_rng(seed).standard_normal(self.dim).astype("<f4")
        return (x / np.linalg.norm(x)).astype("<f4").tobytes()

    def payload(self, cut: int, preset: str = "lossless") -> bytes:
        spec, cal = self.maker.spec, self.maker.calibration
        return codec.encode(self.tensors[cut], cut=cut, spec=spec, preset=preset, calibration=cal)

    def register_prompt_set(self) -> None:
        answer = self.call(
            "EncodeText", pb.TextRequest(bundle_id=self.bid, prompts=PROMPTS).SerializeToString()
        )
        assert answer.code == C.OK, answer.details
        self.known_sets[pb.TextResponse.FromString(answer.body).prompt_set_id] = len(PROMPTS)

    def still_serving(self) -> None:
        """After a batch: the health check says SERVING and a good frame is still answered."""
        check = self.call("Check", HealthCheckRequest().SerializeToString())
        assert check.code == C.OK and HealthCheckResponse.FromString(check.body).status == SERVING, check
        good = self.good[1]
        answer = self.call("Classify", good.SerializeToString())
        assert answer.code == C.OK, answer.details
        self.check_result(good, pb.Result.FromString(answer.body))

    # -- calls ---------------------------------------------------------------------------------
    def call(self, method: str, raw: bytes, token: bool = True) -> Answer:
        rpc = self.channel.unary_unary(METHODS[method][0])  # no serializers: bytes in, bytes out
        try:
            body = rpc(raw, metadata=self.md if token else None, timeout=60)
        except grpc.RpcError as e:
            return Answer(e.code(), e.details() or "", b"")
        return Answer(C.OK, "", body)

    def stream(self, raws: list[bytes]) -> list[pb.Result]:
        rpc = self.channel.stream_stream(STREAM_METHOD)
        return [pb.Result.FromString(b) for b in rpc(iter(raws), metadata=self.md, timeout=120)]

    # -- the oracle ----------------------------------------------------------------------------
    def expect(self, method: str, raw: bytes) -> grpc.StatusCode:
        try:
            msg = METHODS[method][1].FromString(raw)
        except DecodeError:
            return C.INVALID_ARGUMENT
        return getattr(self, f"expect_{method}")(msg)

    def expect_Classify(self, f: pb.Frame) -> grpc.StatusCode:
        if not f.bundle_id:
            return C.INVALID_ARGUMENT
        if f.bundle_id != self.bid:
            return C.FAILED_PRECONDITION
        if f.prompts:
            if not self.prompts_ok(f.prompts, f.templates):
                return C.INVALID_ARGUMENT
        elif not f.prompt_set_id:
            return C.INVALID_ARGUMENT
        elif f.prompt_set_id not in self.known_sets:
            return C.NOT_FOUND
        if f.cut > self.L:
            return C.INVALID_ARGUMENT
        try:
            spec, cal = self.maker.spec, self.maker.calibration
            decoded = codec.decode(f.payload, cut=f.cut, spec=spec, calibration=cal, limits=self.limits)
        except codec.PayloadTooLarge:
            return C.RESOURCE_EXHAUSTED
        except codec.CodecError:
            return C.INVALID_ARGUMENT
        # finite values can still overflow the model or the normalisation: no unit embedding
        with np.errstate(all="ignore"):
            embedding = self.maker.tower.finish(decoded.array[None], f.cut)
        norm = float(np.linalg.norm(embedding.astype(np.float64)))
        return C.OK if math.isfinite(norm) and abs(norm - 1) < 1e-3 else C.INVALID_ARGUMENT

    def expect_EncodeText(self, r: pb.TextRequest) -> grpc.StatusCode:
        if not r.bundle_id:
            return C.INVALID_ARGUMENT
        if r.bundle_id != self.bid:
            return C.FAILED_PRECONDITION
        return C.OK if self.prompts_ok(r.prompts, r.templates) else C.INVALID_ARGUMENT

    def expect_Hello(self, r: pb.HelloRequest) -> grpc.StatusCode:
        return C.OK if r.node_id else C.INVALID_ARGUMENT

    def expect_Check(self, r: HealthCheckRequest) -> grpc.StatusCode:
        return C.OK if r.service in HEALTHY_SERVICES else C.NOT_FOUND

    def expect_Search(self, r: pb.SearchRequest) -> grpc.StatusCode:
        """In the order cloud_service/search/service.py checks (docs/search.md, Search)."""
        if r.bundle_id and r.bundle_id != self.bid:
            return C.FAILED_PRECONDITION
        if bool(r.text.strip()) == bool(r.image) or (r.image and r.templates):
            return C.INVALID_ARGUMENT
        if len(r.image) > MAX_PAYLOAD:
            return C.RESOURCE_EXHAUSTED
        if (r.k or 10) > SEARCH_MAX_K or len(r.node_ids) > search.MAX_NODE_FILTERS:
            return C.INVALID_ARGUMENT
        if any(not text_ok(n) or not n for n in r.node_ids) or not text_ok(r.label):
            return C.INVALID_ARGUMENT
        times = (r.since, r.until)
        if not all(math.isfinite(t) and 0 <= t < TS_MAX for t in times) or (
            r.since and r.until and r.since > r.until
        ):
            return C.INVALID_ARGUMENT
        if r.text.strip():
            return C.OK if self.prompts_ok([r.text], r.templates) else C.INVALID_ARGUMENT
        try:
            search.decode_image(r.image, self.maker.tower.cfg)
        except Exception:
            return C.INVALID_ARGUMENT
        return C.OK

    def expect_Upload(self, r: pb.UploadRequest) -> grpc.StatusCode:
        if not r.node_id or not text_ok(r.node_id) or not r.bundle_id:
            return C.INVALID_ARGUMENT
        if r.bundle_id != self.bid:
            return C.FAILED_PRECONDITION
        if len(r.frames) > UPLOAD_MAX_FRAMES:
            return C.INVALID_ARGUMENT
        for f in r.frames:
            if len(f.embedding) != 4 * self.dim or len(f.labels) > INDEX_MAX_LABELS:
                return C.INVALID_ARGUMENT
            if not text_ok(f.source) or not all(text_ok(x) for x in f.labels):
                return C.INVALID_ARGUMENT
            emb = np.frombuffer(f.embedding, "<f4").astype(np.float32)
            ts = f.captured_at if f.captured_at != 0 else T0
            if check_row(Row(self.bid, r.node_id, f.frame_id, ts, f.source, tuple(f.labels), emb), self.dim):
                return C.INVALID_ARGUMENT
        return C.OK

    @staticmethod
    def prompts_ok(prompts, templates) -> bool:
        try:
            prompt_set(list(prompts), list(templates), LIMITS)
        except PromptError:
            return False
        return True

    # -- checking an answer --------------------------------------------------------------------
    def check(self, category: str, method: str, raw: bytes, got: Answer) -> None:
        """The answer has the expected status; an OK one is a sound answer to the request."""
        TRIED[category] += 1
        SEEN[got.code.name] += 1
        want = self.expect(method, raw)
        assert got.code == want, f"{method}: {got.code.name} ({got.details}), expected {want.name}"
        if got.code != C.OK:
            assert got.details, f"{method}: {got.code.name} without details"
            return
        req, resp = METHODS[method][1].FromString(raw), METHODS[method][2].FromString(got.body)
        if method == "Classify":
            self.check_result(req, resp)
        elif method == "EncodeText":
            n = len(req.prompts)
            emb = np.frombuffer(resp.embeddings, dtype="<f4")
            assert resp.bundle_id == self.bid and emb.size == n * resp.dim and np.isfinite(emb).all()
        elif method == "Hello":
            assert resp.accepted == (req.bundle_id == self.bid) and resp.cloud_bundle_id == self.bid
        elif method == "Search":
            self.check_hits(req, resp)
        elif method == "Upload":
            assert resp.stored + resp.duplicates == len(req.frames)
        else:
            assert resp.status == SERVING

    def check_hits(self, req: pb.SearchRequest, resp: pb.SearchResponse) -> None:
        """At most k hits, best first, each within every filter the request set."""
        assert resp.bundle_id == self.bid and len(resp.hits) <= (req.k or 10)
        scores = [h.score for h in resp.hits]
        assert scores == sorted(scores, reverse=True) and all(-1.001 <= x <= 1.001 for x in scores)
        for h in resp.hits:
            assert not req.node_ids or h.node_id in req.node_ids
            assert (not req.since or h.captured_at >= req.since - 1e-3) and (
                not req.until or h.captured_at <= req.until + 1e-3
            )
            assert not req.label or req.label in h.labels

    def check_result(self, f: pb.Frame, r: pb.Result) -> None:
        assert not r.error.code, f"frame {f.frame_id}: {r.error.code} ({r.error.message})"
        n = len(f.prompts) or self.known_sets[f.prompt_set_id]
        probs = np.array(r.probabilities)
        assert r.frame_id == f.frame_id and r.cut == f.cut and r.bundle_id == self.bid
        assert probs.shape == (n,) and np.isfinite(probs).all(), f"frame {f.frame_id}: probabilities {probs}"
        assert math.isclose(probs.sum(), 1.0, abs_tol=1e-4)
        assert len(r.top) == min(f.top_k or 5, n) and all(0 <= lab.index < n for lab in r.top)


# -- strategies (recipes of plain data; the test applies them to the module's good requests) -----------

EDGE_U32 = st.sampled_from([0, 1, 2, 3, 17, 255, 256, 65535, 2**16, 2**31 - 1, 2**31, 2**32 - 1])
HEADER_FIELDS = [f.name for f in fields(codec.Header) if f.name not in ("body_len", "crc")]
FIELD_MAX = {"kind": 255, "dtype": 255, "flags": 255, "preset_id": 255, "cut": 65535}
odd_text = st.text(max_size=40)
prompt_lists = st.one_of(
    st.lists(odd_text, max_size=10),
    st.lists(
        st.sampled_from(["cat", "a dog", "x" * 60, "  ", "", "\u200b", "é" * 61]), min_size=1, max_size=10
    ),
    st.integers(61, 10**6).map(lambda n: ["x" * n]),  # oversize prompts (up to 1 MB)
    st.integers(9, 10**4).map(lambda n: [f"p{i}" for i in range(n)]),  # too many prompts
)
template_lists = st.lists(
    st.one_of(
        odd_text, st.sampled_from(["a photo of a {}", "{}", "{} {}", "no slot", "{x}", "a {} }", "{" * 61])
    ),
    max_size=18,
)
set_ids = st.one_of(st.sampled_from(["", "ps-nope", "ps-" + "0" * 24, "known"]), odd_text)
frame_changes = st.one_of(
    st.tuples(st.just("bundle_id"), st.one_of(st.sampled_from(["", "b-ffffffffffffffff", "bundle", "upper"]), odd_text)),
    st.tuples(st.just("cut"), st.one_of(st.integers(0, 8), EDGE_U32)),
    st.tuples(st.just("codec"), st.one_of(odd_text, st.sampled_from(["lossless", "png", "no-such-codec"]))),
    st.tuples(st.just("frame_id"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("node_id"), odd_text),
    st.tuples(st.just("top_k"), st.one_of(st.integers(0, 10), EDGE_U32)),
    st.tuples(st.just("prompts"), prompt_lists),
    st.tuples(st.just("templates"), template_lists),
    st.tuples(st.just("prompt_set_id"), set_ids),
    st.tuples(st.just("payload"), st.one_of(
        st.tuples(st.just("bytes"), st.binary(max_size=300)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6)),
        st.tuples(st.just("oversize"), st.sampled_from([1, 1000, 3 << 20])),
        st.tuples(st.just("preset"), st.sampled_from([*codec.PRESETS, *codec.IMAGE_PRESETS])),
        st.tuples(st.just("other_cut"), st.integers(0, 8)),
    )),
)  # fmt: skip


def apply_frame_changes(api: Api, base: pb.Frame, changes: list[tuple[str, object]]) -> pb.Frame:
    f = pb.Frame()
    f.CopyFrom(base)
    for name, value in changes:
        if name == "payload":
            f.payload = mutate_payload(api, f.cut, value)  # type: ignore[arg-type]
        elif name in ("prompts", "templates"):
            f.ClearField(name)
            getattr(f, name).extend(value)
        elif name == "bundle_id" and value == "upper":
            f.bundle_id = api.bid.upper()
        elif name == "prompt_set_id" and value == "known":
            f.prompt_set_id = next(iter(api.known_sets))
        else:
            setattr(f, name, value)
    return f


def mutate_payload(api: Api, cut: int, how: tuple[str, object]) -> bytes:
    kind, arg = how
    k = min(cut, api.L)
    good = api.payload(k)
    if kind == "bytes":
        return arg  # type: ignore[return-value]
    if kind == "truncate":
        return good[: int(arg) % len(good)]  # type: ignore[call-overload]
    if kind == "oversize":
        return b"\0" * (MAX_PAYLOAD + int(arg))  # type: ignore[call-overload]
    if kind == "other_cut":
        return api.payload(int(arg) % (api.L + 1))  # type: ignore[call-overload]
    try:
        return api.payload(k, str(arg))
    except codec.CodecError:  # an image preset at cut >= 1: what a confused sender would still send
        return api.payload(0, str(arg))


def mutate_bytes(raw: bytes, how: tuple[str, object]) -> bytes:
    kind, arg = how
    if kind == "random":
        return arg  # type: ignore[return-value]
    if kind == "truncate":
        return raw[: int(arg) % max(1, len(raw))]  # type: ignore[call-overload]
    if kind == "flip":
        b = bytearray(raw)
        for bit in arg:  # type: ignore[attr-defined]
            b[(bit // 8) % len(b)] ^= 1 << (bit % 8)
        return bytes(b)
    pos, extra = arg  # type: ignore[misc]
    return raw[: pos % (len(raw) + 1)] + extra + raw[pos % (len(raw) + 1) :]


byte_mutations = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("flip"), st.lists(st.integers(0, 10**7), min_size=1, max_size=4)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=12))),
)
BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80", b"\xfe\xfe"]
# the string fields (field numbers) of each request message
STRING_FIELDS = {
    "Classify": [1, 3, 5, 7, 8, 9],
    "EncodeText": [1, 2, 3, 4],
    "Hello": [1, 2, 3, 5, 6],
    "Check": [1],
    "Search": [1, 2, 3, 6, 9],
    "Upload": [1, 2],
}


def length_delimited(field: int, value: bytes) -> bytes:
    """One length-delimited field on the wire (protobuf's Python API refuses to write bad UTF-8)."""
    n, varint = len(value), b""
    while True:
        varint += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            break
    return bytes([field << 3 | 2]) + varint + value


EXTREMES = [math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e30, 1e-45, -0.0]


def text_ok(value: str) -> bool:
    """A node id, source, label or filter the search store can hold (search.text_value)."""
    return len(value) <= INDEX_MAX_TEXT_CHARS and "\x00" not in value


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


times = st.one_of(st.sampled_from([0.0, -1.0, T0, T0 + 1e6, 1e300, *EXTREMES]), st.floats(0, 2e9))
search_changes = st.lists(st.one_of(
    st.tuples(st.just("bundle_id"), st.one_of(st.sampled_from(["", "b-ffffffffffffffff", "bundle"]), odd_text)),
    st.tuples(st.just("text"), st.one_of(st.sampled_from(["", "  ", "a cat", "x" * 61, "\x00"]), odd_text)),
    st.tuples(st.just("templates"), template_lists),
    st.tuples(st.just("image"), st.one_of(
        st.sampled_from(["good", "truncated", "oversize", "tiny", "gif", "16bit"]), st.binary(max_size=200)
    )),
    st.tuples(st.just("k"), st.one_of(st.integers(0, 1002), EDGE_U32)),
    st.tuples(st.just("node_ids"), st.one_of(
        st.lists(st.one_of(st.sampled_from(["fuzz-up", "", "x" * 301]), odd_text), max_size=4),
        st.integers(65, 70).map(lambda n: [f"n{i}" for i in range(n)]),
    )),
    st.tuples(st.sampled_from(["since", "until"]), times),
    st.tuples(st.just("label"), st.one_of(st.sampled_from(["", "cat", "x" * 301]), odd_text)),
), min_size=1, max_size=4)  # fmt: skip

indexed_frames = st.lists(st.tuples(
    st.sampled_from(["good", "short", "long", "nan", "zero", "scaled", "random"]),
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63 - 1, 2**63])),
    times,
    odd_text,  # source
    st.one_of(st.lists(odd_text, max_size=3), st.just(["l"] * 33)),
), max_size=5)  # fmt: skip
upload_changes = st.lists(st.one_of(
    st.tuples(st.just("bundle_id"), st.one_of(st.sampled_from(["", "b-ffffffffffffffff"]), odd_text)),
    st.tuples(st.just("node_id"), st.one_of(st.sampled_from(["", "fuzz-up", "x" * 301]), odd_text)),
    st.tuples(st.just("frames"), st.one_of(indexed_frames, st.just("too-many"))),
), min_size=1, max_size=3)  # fmt: skip


def apply_search_changes(api: Api, changes: list[tuple[str, object]]) -> pb.SearchRequest:
    r = pb.SearchRequest()
    r.CopyFrom(api.good_requests["Search"])
    for name, value in changes:
        if name == "image":
            r.text = ""  # an image query (a later text change may make it both)
            r.image = image_bytes(api, value)  # type: ignore[arg-type]
        elif name in ("templates", "node_ids"):
            r.ClearField(name)
            getattr(r, name).extend(value)  # type: ignore[call-overload]
        else:
            setattr(r, name, value)
    return r


def image_bytes(api: Api, how: str | bytes) -> bytes:
    if isinstance(how, bytes):
        return how
    pixels = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if how == "gif":
        Image.fromarray(pixels).save(buf, format="GIF")
    elif how == "16bit":
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(buf, format="PNG")
    else:
        return {"good": api.image, "truncated": api.image[: len(api.image) // 2], "tiny": png(pixels),
                "oversize": b"\0" * (MAX_PAYLOAD + 1)}[how]  # fmt: skip
    return buf.getvalue()


def apply_upload_changes(api: Api, changes: list[tuple[str, object]]) -> pb.UploadRequest:
    r = pb.UploadRequest()
    r.CopyFrom(api.good_requests["Upload"])
    for name, value in changes:
        if name != "frames":
            setattr(r, name, value)
            continue
        r.ClearField("frames")
        if value == "too-many":
            good = api.good_requests["Upload"].frames[0]  # type: ignore[attr-defined]
            r.frames.extend([good] * (UPLOAD_MAX_FRAMES + 1))
            continue
        for i, (kind, frame_id, ts, source, labels) in enumerate(value):  # type: ignore[attr-defined]
            good = np.frombuffer(api.unit_bytes(i), "<f4")
            emb = {
                "good": good.tobytes(), "short": good[:-1].tobytes(), "long": np.r_[good, 0].astype("<f4").tobytes(),
                "nan": np.full_like(good, np.nan).tobytes(), "zero": np.zeros_like(good).tobytes(),
                "scaled": (good * 1.5).astype("<f4").tobytes(), "random": bytes(range(4 * api.dim)),
            }[kind]  # fmt: skip
            r.frames.append(
                pb.IndexedFrame(
                    frame_id=frame_id, captured_at=ts, source=source, labels=labels, embedding=emb
                )
            )
    return r


other_changes = st.one_of(
    st.tuples(st.just("EncodeText"), st.lists(st.one_of(
        st.tuples(st.just("bundle_id"), st.one_of(st.sampled_from(["", "b-ffffffffffffffff"]), odd_text)),
        st.tuples(st.just("node_id"), odd_text),
        st.tuples(st.just("prompts"), prompt_lists),
        st.tuples(st.just("templates"), template_lists),
    ), min_size=1, max_size=3)),
    st.tuples(st.just("Hello"), st.lists(st.one_of(
        st.tuples(st.just("node_id"), st.one_of(st.just(""), odd_text.map(lambda t: "fuzz-" + t))),
        st.tuples(st.just("bundle_id"), st.one_of(st.sampled_from(["", "b-ffffffffffffffff"]), odd_text)),
        st.tuples(st.just("codecs"), st.lists(odd_text, max_size=5)),
        st.tuples(st.just("cuts"), st.lists(EDGE_U32, max_size=5)),
        st.tuples(st.sampled_from(["version", "mode"]), odd_text),
        st.tuples(st.just("frames_answered"), st.integers(0, 2**64 - 1)),
    ), min_size=1, max_size=3)),
    st.tuples(st.just("Check"), st.lists(
        st.tuples(st.just("service"), st.one_of(st.sampled_from([*HEALTHY_SERVICES, "grpc.health.v1.Health"]), odd_text)),
        min_size=1, max_size=1,
    )),
)  # fmt: skip

stream_items = st.one_of(
    st.tuples(st.just("good"), st.integers(0, 8)),
    st.tuples(st.just("bad"), st.tuples(st.integers(0, 8), st.lists(frame_changes, min_size=1, max_size=2))),
    st.tuples(st.just("unparsable"), st.sampled_from(BAD_UTF8)),
)
