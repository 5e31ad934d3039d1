"""Cut planner: which cut k and codec preset answer a frame soonest on this device and this link.

For a ViT every inner cut carries the same tensor ([tokens, width]), so the choice is driven by
where the compute runs and what the codec makes of the tensor at that cut, not by the tensor size.
The planner measures what it can on this device and models the rest (Neurosurgeon-style):

    latency(k, preset) = preprocess + edge stages[0:k] + encode
                         + bytes(k, preset) * 8 / bandwidth + rtt
                         + (decode + cloud stages[k:L] + head) / cloud_speedup

* stage times: each vision stage (embed, every block, head) timed with ONNX Runtime at batch 1 here;
* bytes and codec times: real frames, encoded from the activations of sample images at every cut,
  counted as the serialised gRPC Frame (payload, ids, codec name and the prompts it carries);
* the cloud runs the same stages `cloud_speedup` times faster than this device (1 = same hardware);
* k = 0 uploads the image (JPEG or PNG, from the preset), k = L the embedding; "local" answers with
  no network at all (full local inference, what the node does offline).
Text encoding is left out (embeddings are cached on both sides; the prompt strings are in the bytes),
and so is queueing in the cloud.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from splitclip import codec
from splitclip.bundle import Bundle
from splitclip.preprocess import ImageLike, normalize, to_model_input
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower
from splitclip.wire import pb

LOCAL = -1  # the cut value of the "answer locally" plan


@dataclass(frozen=True)
class StageProfile:
    """Median ms per frame on this device (batch 1)."""

    preprocess_ms: float  # decode/resize to the model input (uint8)
    normalize_ms: float  # uint8 -> normalised float pixels
    stage_ms: tuple[float, ...]  # [embed, block_0 .. block_{L-1}, head]

    @property
    def num_blocks(self) -> int:
        return len(self.stage_ms) - 2

    @property
    def tower_ms(self) -> float:
        """Normalise + every vision stage: the image tower after preprocessing."""
        return self.normalize_ms + sum(self.stage_ms)

    def edge_compute_ms(self, k: int) -> float:
        """Tower compute on the edge for cut k (k = LOCAL: all of it)."""
        if k == 0:
            return 0.0
        if k in (self.num_blocks, LOCAL):
            return self.tower_ms
        return self.normalize_ms + sum(self.stage_ms[: k + 1])  # embed + blocks[0:k]

    def edge_ms(self, k: int) -> float:
        """Edge time before the codec at cut k: preprocessing + its share of the tower."""
        return self.preprocess_ms + self.edge_compute_ms(k)

    def cloud_ms(self, k: int) -> float:
        """The rest of the tower at cut k, at this device's speed."""
        return 0.0 if k == LOCAL else self.tower_ms - self.edge_compute_ms(k)


@dataclass(frozen=True)
class FrameCost:
    """Median bytes and codec times of one (cut, preset) over the sample images."""

    cut: int
    preset: str
    bytes: int  # the serialised Frame (payload + ids + prompts)
    encode_ms: float
    decode_ms: float
    payload_bytes: int = 0  # the codec's payload alone


@dataclass(frozen=True)
class Plan:
    cut: int  # LOCAL (-1) = full local inference
    preset: str  # "" for local
    bytes: int
    edge_ms: float  # compute + encode on the edge
    upload_ms: float  # bytes over the link + one round trip
    cloud_ms: float  # decode + compute in the cloud, scaled by the cloud's speed-up
    total_ms: float

    @property
    def label(self) -> str:
        return "local" if self.cut == LOCAL else f"cut {self.cut}, {self.preset}"


def median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (first ORT run allocates)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stage_times(rt: BundleRuntime, image: ImageLike, repeats: int, edge: str = "fp32") -> tuple[float, ...]:
    """Ms of embed, each block and the head at batch 1, with the `edge` ("fp32" / "int8") stages.

    Timed as the node runs them, in whole passes through the tower: the median over passes of the
    time from the pass's start to the end of each stage, differenced. Timing each stage alone misleads
    under a CPU quota (a cgroup, a phone's governor): a stage shorter than the quota runs at full speed
    and the throttling falls between the timed calls, so on a ViT-B/32 at 0.25 CPU the int8 tower
    profiled as 45 ms in stages and took 110 ms in one go."""
    cfg = rt.preprocess_config
    pixels = normalize(to_model_input(image, cfg)[None], cfg)  # [1, 3, H, W]
    L = rt.num_blocks

    def one_pass() -> list[float]:
        t0 = time.perf_counter()
        hidden = rt.embed(pixels, edge)  # [1, tokens, width]
        ends = [time.perf_counter()]
        for i in range(L):
            hidden = rt.run_blocks(hidden, i, i + 1, edge)
            ends.append(time.perf_counter())
        rt.head(hidden, edge)  # [1, embed_dim]
        ends.append(time.perf_counter())
        return [(t - t0) * 1e3 for t in ends]

    one_pass()  # warm-up (first ORT run allocates)
    passes = [one_pass() for _ in range(max(1, repeats))]
    cumulative = [statistics.median(p[j] for p in passes) for j in range(L + 2)]
    return tuple(max(0.0, c - prev) for prev, c in zip([0.0, *cumulative[:-1]], cumulative, strict=True))


def profile_stages(rt: BundleRuntime, image: ImageLike, repeats: int = 20) -> StageProfile:
    cfg = rt.preprocess_config
    img = to_model_input(image, cfg)  # uint8 [H, W, 3]
    return StageProfile(
        preprocess_ms=median_ms(lambda: to_model_input(image, cfg), repeats),
        normalize_ms=median_ms(lambda: normalize(img[None], cfg), repeats),
        stage_ms=stage_times(rt, image, repeats),
    )


def frame_costs(
    rt: BundleRuntime,
    bundle: Bundle,
    images: Sequence[ImageLike],
    presets: Sequence[str],
    cuts: Sequence[int] | None = None,
    prompts: Sequence[str] = (),
) -> list[FrameCost]:
    """Encode the tensor each sample image gives at every cut with every preset. `bytes` is the whole
    serialised gRPC Frame the edge sends: payload plus ids, codec name and the `prompts`."""
    spec = codec.TensorSpec.from_manifest(rt.manifest)
    cal = bundle.calibration()
    tower = Tower(rt)
    cuts = list(range(rt.num_blocks + 1)) if cuts is None else list(cuts)
    pixels = tower.model_input(list(images))  # uint8 [n, H, W, 3]
    wires = {k: list(tower.at_cut(pixels, k)) for k in cuts}
    out = []
    for k in cuts:
        for name in presets:
            preset = codec.get_preset(name)
            sizes, payloads, enc, dec = [], [], [], []
            # one untimed round trip: first-call costs (lazy imports, basis caches) are not per frame
            codec.decode(codec.encode(wires[k][0], cut=k, spec=spec, preset=preset, calibration=cal),
                         cut=k, spec=spec, calibration=cal)  # fmt: skip
            for x in wires[k]:
                t0 = time.perf_counter()
                payload = codec.encode(x, cut=k, spec=spec, preset=preset, calibration=cal)
                t1 = time.perf_counter()
                codec.decode(payload, cut=k, spec=spec, calibration=cal)
                t2 = time.perf_counter()
                frame = pb.Frame(node_id="edge-0000", frame_id=1 << 20, bundle_id=rt.manifest.bundle_id,
                                 cut=k, codec=name, payload=payload, prompts=list(prompts), top_k=5)  # fmt: skip
                sizes.append(frame.ByteSize())
                payloads.append(len(payload))
                enc.append((t1 - t0) * 1e3)
                dec.append((t2 - t1) * 1e3)
            med = statistics.median
            out.append(FrameCost(k, name, int(med(sizes)), med(enc), med(dec), int(med(payloads))))
    return out


def plan(
    profile: StageProfile,
    costs: Sequence[FrameCost],
    *,
    mbps: float,
    rtt_ms: float,
    cloud_speedup: float = 1.0,
) -> list[Plan]:
    """Every (cut, preset) plan plus the local one, fastest first."""
    if mbps <= 0 or rtt_ms < 0 or cloud_speedup <= 0:
        raise ValueError(
            f"expected mbps > 0, rtt_ms >= 0, cloud_speedup > 0; got {mbps}, {rtt_ms}, {cloud_speedup}"
        )
    plans = [Plan(LOCAL, "", 0, profile.edge_ms(LOCAL), 0.0, 0.0, profile.edge_ms(LOCAL))]
    seen: set[tuple[int, int]] = set()  # (cut, payload bytes) of image / embedding plans kept
    for c in costs:
        if c.cut in (0, profile.num_blocks):  # image / embedding: presets often give the same frame
            if (c.cut, c.payload_bytes) in seen:
                continue
            seen.add((c.cut, c.payload_bytes))
        edge = profile.edge_ms(c.cut) + c.encode_ms
        upload = c.bytes * 8 / (mbps * 1e3) + rtt_ms  # bits / (bits per ms)
        cloud = (c.decode_ms + profile.cloud_ms(c.cut)) / cloud_speedup
        plans.append(Plan(c.cut, c.preset, c.bytes, edge, upload, cloud, edge + upload + cloud))
    return sorted(plans, key=lambda p: (p.total_ms, p.cut))


def as_dict(p: Plan) -> dict[str, object]:
    return {**asdict(p), "label": p.label}
