"""CPU per frame of the raw ORT tail at the batch sizes the VisionTail actually ran, and the niceness
of each process: the two readings `splitclip bench cloud` needs to tell a slow tail (more CPU per
frame than ORT alone at the same batch sizes) from small batches (ORT's own cost per frame is higher
at batch 12 than at 32) and from a tail that merely waited for the CPU (others ran first).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MixCpu:
    """Raw ORT CPU per frame at each batch size, and its average over a histogram of sizes."""

    per_size_ms: dict[int, float] = field(default_factory=dict)  # batch size -> CPU ms per frame
    weights: dict[int, int] = field(default_factory=dict)  # batch size -> frames the tail ran at it

    @property
    def ms_per_frame(self) -> float:
        frames = sum(self.weights.values())
        if not frames:
            return 0.0
        return sum(self.per_size_ms[s] * n for s, n in self.weights.items()) / frames


def frames_by_size(hist: dict[Any, int]) -> dict[int, int]:
    """A tail histogram (batch size -> calls, keys may be strings after Ray) as size -> frames."""
    return {int(k): int(k) * int(v) for k, v in hist.items() if int(v) > 0}


def raw_cpu_at_sizes(
    bundle: str, cut: int, frames: list[Any], hist: dict[Any, int], threads: int | None, seconds: float,
    also: tuple[int, ...] = (),
) -> MixCpu:  # fmt: skip
    """CPU seconds of this process (every ORT thread counts) per frame, TailCore on batches of each
    size the tail ran (and of the sizes in `also`), for about `seconds` per size; the mix weights
    each size by the frames the tail ran at it."""
    import numpy as np

    from cloud_service.vision_tail import TailCore

    core = TailCore(bundle, threads or 0, spinning=False)
    out = MixCpu(weights=frames_by_size(hist))
    for size in sorted({*out.weights, *also}):
        stacked = np.stack([frames[i % len(frames)] for i in range(size)])  # [size, tokens, width]
        core.run_group(cut, stacked)  # warm-up (ORT plans per shape)
        n, c0, t0 = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            core.run_group(cut, stacked)
            n += size
        out.per_size_ms[size] = 1e3 * (time.process_time() - c0) / n
    return out


def processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, command line, the fields of /proc/pid/stat after the name) of every live process."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(d), cmd, st


def nice_by_role(role_of: Any) -> dict[str, set[int]]:
    """role -> the niceness values of its live processes (field 19 of stat)."""
    out: dict[str, set[int]] = {}
    for pid, cmd, st in processes():
        if cmd:  # not a kernel thread
            out.setdefault(role_of(pid, cmd), set()).add(int(st[16]))
    return out


def tail_share(cpu: Counter[str]) -> float:
    """The VisionTail's share of all CPU seconds spent in a window."""
    total = sum(cpu.values())
    return cpu.get("VisionTail", 0.0) / total if total else 0.0
