"""A weak device for benchmarks: a cgroup v1 CPU quota (cpu.cfs_quota_us / cpu.cfs_period_us) that a child process runs under.

`CpuLimit(0.25).start()` creates /sys/fs/cgroup/cpu/splitclip-e2e-<pid> with quota = 0.25 x period;
`wrap(cmd)` returns a command line that puts its own shell into the group and then execs `cmd`, so the
process and every thread and child it makes run under the quota from their first instruction;
`remove()` moves whatever is left back to the root group and deletes the group. The period defaults to
10 ms rather than the kernel's 100 ms: with 100 ms a process that computes in bursts runs at full speed
for 25 ms and is then frozen for 75 ms, which is a throttling artefact, not a slow CPU; with 10 ms a
few-ms frame is stretched about 4x, like a CPU a quarter as fast. Where the cgroup cannot be written
(no root, cgroup v2 only, a read-only /sys), `start()` returns False and `why` says why: the caller
runs unlimited and says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import time
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")


class CpuLimit:
    def __init__(self, fraction: float, *, period_us: int = 10_000, name: str | None = None) -> None:
        if not fraction > 0:
            raise ValueError(f"the CPU fraction must be > 0, got {fraction}")
        self.fraction = fraction
        # the kernel's least quota is 1 ms: a shorter period would silently raise the fraction
        self.period_us = max(int(period_us), math.ceil(1000 / fraction))
        self.quota_us = round(fraction * self.period_us)
        self.path = CPU_ROOT / (name or f"splitclip-e2e-{os.getpid()}")
        self.active = False
        self.why = ""

    def describe(self) -> str:
        if not self.active:
            return f"unlimited (no CPU quota: {self.why})"
        return (
            f"{self.quota_us / self.period_us:g} CPU: cgroup v1 {self.path} with cpu.cfs_quota_us="
            f"{self.quota_us}, cpu.cfs_period_us={self.period_us}"
        )

    def start(self) -> bool:
        """Create the group; False (and `why`) when cgroups are not writable here."""
        if not (CPU_ROOT / "cgroup.procs").is_file():
            self.why = f"{CPU_ROOT} is not a cgroup v1 cpu hierarchy"
            return False
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        except OSError as e:
            self.why = f"cannot write {self.path}: {e.strerror or e}"
            with contextlib.suppress(OSError):
                self.path.rmdir()
            return False
        self.active = True
        return True

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside the group (unchanged when the group is not active)."""
        if not self.active:
            return cmd
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]

    def throttled(self) -> dict[str, int]:
        """cpu.stat of the group: nr_periods, nr_throttled, throttled_time (ns)."""
        if not self.active:
            return {}
        out = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                out[k] = int(v)
        return out

    def remove(self) -> None:
        if not self.active:
            return
        for _ in range(50):
            with contextlib.suppress(OSError):
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (CPU_ROOT / "cgroup.procs").write_text(pid)
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self.active = False

    def __enter__(self) -> CpuLimit:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
