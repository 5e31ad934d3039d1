"""The node's start-up profile: its own stage times and codec costs per (cut, preset), cached per bundle and device.

Stage times (preprocess, normalise, embed, every block, head; and the int8 edge stages when the bundle
has them) and each preset's encode/decode time and payload bytes at every cut are measured here with edge_node/planner.py's timers (medians of a few
repeats on deterministic synthetic images), then written to a JSON file under SPLITCLIP_CACHE_DIR
(default ~/.cache/splitclip) named by the bundle id and a digest of the device (hostname, CPU model,
ORT threads), so a restart reads it back instead of measuring again. Presets asked for later that the
file lacks are measured then and added.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_node.planner import StageProfile, frame_costs, profile_stages, stage_times
from edge_node.settings import cache_root
from splitclip import codec
from splitclip.bundle import Bundle
from splitclip.runtime import BundleRuntime

log = logging.getLogger("splitclip.edge")

VERSION = 2  # of the cache file's layout and method (2: stages timed in whole passes)


@dataclass(frozen=True)
class CodecCost:
    """Median ms and payload bytes of one preset at one cut on this device."""

    encode_ms: float
    decode_ms: float  # here; the cloud's decode is learnt from its timings
    payload_bytes: float


@dataclass(frozen=True)
class EdgeProfile:
    bundle_id: str
    device: str
    stages: StageProfile
    codecs: dict[tuple[int, str], CodecCost] = field(default_factory=dict)
    measured_s: float = 0.0  # how long measuring took (0 when read from the cache)
    int8: StageProfile | None = None  # the int8 edge stages' times (stages without one: the fp32 time)

    def edge_stages(self, edge: str) -> StageProfile | None:
        """The stage times of `edge` ("fp32" or "int8") stages; None when not profiled."""
        return self.stages if edge == "fp32" else self.int8 if edge == "int8" else None

    @property
    def num_blocks(self) -> int:
        return self.stages.num_blocks

    def to_json(self) -> str:
        s = self.stages
        body = {
            "version": VERSION,
            "bundle_id": self.bundle_id,
            "device": self.device,
            "stages": {
                "preprocess_ms": s.preprocess_ms,
                "normalize_ms": s.normalize_ms,
                "stage_ms": s.stage_ms,
                **({"int8_stage_ms": self.int8.stage_ms} if self.int8 is not None else {}),
            },
            "codecs": [{"cut": k, "preset": p, **c.__dict__} for (k, p), c in sorted(self.codecs.items())],
        }
        return json.dumps(body, indent=1) + "\n"

    @staticmethod
    def from_json(text: str) -> EdgeProfile:
        d = json.loads(text)
        if d.get("version") != VERSION:
            raise ValueError(f"profile version {d.get('version')!r}, expected {VERSION}")
        st = d["stages"]
        stages = StageProfile(
            float(st["preprocess_ms"]), float(st["normalize_ms"]), tuple(map(float, st["stage_ms"]))
        )
        codecs = {
            (int(r["cut"]), str(r["preset"])): CodecCost(
                float(r["encode_ms"]), float(r["decode_ms"]), float(r["payload_bytes"])
            )
            for r in d["codecs"]
        }
        int8 = st.get("int8_stage_ms")
        q = StageProfile(stages.preprocess_ms, stages.normalize_ms, tuple(map(float, int8))) if int8 else None
        return EdgeProfile(str(d["bundle_id"]), str(d["device"]), stages, codecs, int8=q)


def device_key() -> str:
    """What makes timings comparable: this host, its CPU model and the ORT thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = os.environ.get("SPLITCLIP_ORT_THREADS", "0") or "0"
    return f"{socket.gethostname()}|{cpu}|ort-threads={threads}"


def cache_file(cache_dir: Path | None, bundle_id: str, device: str) -> Path:
    root = cache_root(cache_dir)
    digest = hashlib.sha256(device.encode()).hexdigest()[:12]
    return root / "profiles" / f"{bundle_id}-{digest}.json"


def sample_images(n: int = 3, size: int = 256) -> list[np.ndarray]:
    """Deterministic smooth images with edges (noise would make PNG sizes a worst case): uint8 [S, S, 3]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * (i + 1) + yy))
        g = ((xx - 0.5) ** 2 + (yy - 0.3 * i) ** 2 < 0.08).astype(float)
        b = yy * (1 - xx)
        out.append((np.stack([r, 0.6 * g + 0.2, b], -1) * 255).astype(np.uint8))
    return out


def profile_int8_stages(
    rt: BundleRuntime, fp32: StageProfile, image: np.ndarray, repeats: int
) -> StageProfile:
    """The int8 edge stages' times (batch 1); preprocess and normalise are the fp32 profile's."""
    return StageProfile(fp32.preprocess_ms, fp32.normalize_ms, stage_times(rt, image, repeats, "int8"))


def usable_presets(bundle: Bundle, presets: Iterable[str]) -> list[str]:
    """The named presets this node can run on this bundle (known, and calibrated when they need it)."""
    has_cal = bundle.has_calibration
    out = []
    for name in dict.fromkeys(presets):
        p = codec.ALL_PRESETS.get(name)
        if p is not None and (has_cal or not p.needs_calibration):
            out.append(name)
    return out


def load_or_measure(
    bundle: Bundle,
    rt: BundleRuntime,
    presets: Iterable[str],
    *,
    cache_dir: Path | None = None,
    repeats: int = 5,
) -> EdgeProfile:
    """The profile of this bundle on this device, with every usable preset in `presets` at every cut."""
    device = device_key()
    bundle_id = bundle.manifest.bundle_id
    path = cache_file(cache_dir, bundle_id, device)
    wanted = usable_presets(bundle, presets)
    prof: EdgeProfile | None = None
    cached = False
    if path.is_file():
        try:
            prof = EdgeProfile.from_json(path.read_text())
            cached = (prof.bundle_id, prof.device) == (bundle_id, device)
            prof = prof if cached else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("profile cache %s unreadable (%s): measuring again", path, e)
            prof = None
    t0 = time.perf_counter()
    images = sample_images()
    if prof is None:
        prof = EdgeProfile(bundle_id, device, profile_stages(rt, images[0], repeats))
    int8 = prof.int8
    if int8 is None and rt.has_int8:
        int8 = profile_int8_stages(rt, prof.stages, images[0], repeats)
    have = {p for _, p in prof.codecs}
    missing = [p for p in wanted if p not in have]
    if cached and not missing and int8 is prof.int8:
        return prof
    codecs = dict(prof.codecs)
    images_only = [p for p in missing if p in codec.IMAGE_PRESETS]  # image presets apply at cut 0 only
    every_cut = [p for p in missing if p not in codec.IMAGE_PRESETS]
    measured = frame_costs(rt, bundle, images, every_cut) if every_cut else []
    measured += frame_costs(rt, bundle, images, images_only, cuts=[0]) if images_only else []
    for c in measured:
        codecs[c.cut, c.preset] = CodecCost(c.encode_ms, c.decode_ms, float(c.payload_bytes))
    prof = EdgeProfile(bundle_id, device, prof.stages, codecs, measured_s=time.perf_counter() - t0, int8=int8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(prof.to_json())
        tmp.replace(path)
    except OSError as e:  # a read-only home: keep the profile in memory, measure again next start
        log.warning("cannot write the profile cache %s: %s", path, e)
    log.info("profiled %s on this device in %.1f s (%d presets)", bundle_id, prof.measured_s, len(missing))
    return prof
