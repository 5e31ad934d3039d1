"""Run `python -m cloud_service.cli` (local Ray + Serve + embedded Valkey) as a child process group.

Used by the demo, the edge benchmark and the end-to-end tests. The cloud gets its own session, so
`kill()` (SIGKILL to the whole session: the driver, Ray's GCS, raylet and workers, Valkey) is a real
cloud death, and `stop()` (SIGTERM, then SIGKILL after a grace period) a clean shutdown. Nothing
here imports ray: the edge only spawns the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from splitclip.procs import free_port, session_members, signal_session

READY_MARK = "gRPC on "


class CloudProcess:
    def __init__(
        self,
        bundle: Path,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        num_cpus: int = 2,
        search: bool = False,
        pg_url: str | None = None,
        pg_data_dir: Path | None = None,
    ) -> None:
        """search: fleet search on (`--search`), on `pg_url` or else an embedded PostgreSQL the cloud
        starts on `pg_data_dir` (default: the cloud's) and stops when it stops."""
        self.bundle = Path(bundle).resolve()
        self.port = port or free_port()
        self.log_path = log_path or Path(f"/tmp/splitclip-cloud-{self.port}.log")
        self.env = env or {}
        self.num_cpus = num_cpus
        self.search, self.pg_url, self.pg_data_dir = search, pg_url, pg_data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The driver's pid, which is also the id of the cloud's session."""
        assert self.proc is not None, "the cloud is not running"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 240.0) -> float:
        """Start and wait until the gRPC proxy serves; returns the seconds it took."""
        t0 = time.monotonic()
        root = Path(__file__).resolve().parent.parent
        cmd = [
            sys.executable, "-m", "cloud_service.cli",
            "--bundle", str(self.bundle),
            "--port", str(self.port),
            "--http-port", str(free_port()),
            "--num-cpus", str(self.num_cpus),
        ]  # fmt: skip
        if self.search:
            cmd.append("--search")
        if self.pg_url:
            cmd += ["--pg-url", self.pg_url]
        if self.pg_data_dir:
            cmd += ["--pg-data-dir", str(self.pg_data_dir)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never someone's cluster
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while True:
            text = self.log_path.read_text(errors="replace")
            if READY_MARK in text:
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the cloud exited with {self.proc.returncode}; see {self.log_path}:\n{text[-3000:]}"
                )
            if time.monotonic() - t0 > timeout_s:
                self.kill()
                raise TimeoutError(f"the cloud was not up after {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def kill(self) -> None:
        """Sudden death: SIGKILL to the cloud's whole process group."""
        if self.proc is None:
            return
        signal_session(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        _wait_session_gone(self.proc.pid, 10.0)
        self.proc = None

    def stop(self, grace_s: float = 60.0) -> None:
        """Clean shutdown (the cloud stops Serve, Ray and Valkey), SIGKILL if it takes too long."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)  # the driver shuts Serve, Ray and Valkey down
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace_s)
        signal_session(self.proc.pid, signal.SIGKILL)  # whatever of the session is left
        self.proc.wait()
        _wait_session_gone(self.proc.pid, 10.0)
        self.proc = None

    def __enter__(self) -> CloudProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_session_gone(sid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
