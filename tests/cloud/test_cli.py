"""`splitclip cloud` as a user runs it: a subprocess that starts Ray, an embedded Valkey and Serve,
prints the gRPC address, answers, and shuts everything down on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cloud_client import CloudClient
from cloud_service.grpc_api import pb
from demo.cloudproc import free_port
from splitclip.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]


def test_splitclip_cloud_serves_until_sigterm(tiny_bundle_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SPLITCLIP_REDIS_URL"}
    env["SPLITCLIP_NODE_TOKEN"] = "cli-token"
    log = (tmp_path / "cloud.log").open("w+")
    cmd = [sys.executable, "-m", "cloud_service.cli", "--bundle", str(tiny_bundle_dir), "--port", str(port),
           "--http-port", str(free_port()), "--num-cpus", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # a loaded CI box starts Ray slowly
        text = ""
        while not re.search(r"gRPC on 127\.0\.0\.1:(\d+)", text):
            assert proc.poll() is None, f"splitclip cloud exited early:\n{text}"
            assert time.monotonic() < deadline, f"no gRPC address printed:\n{text}"
            time.sleep(0.5)
            log.seek(0)
            text = log.read()
        assert "embedded Valkey" in text
        bundle_id = load_bundle(tiny_bundle_dir).id
        with CloudClient(f"127.0.0.1:{port}", token="cli-token") as c:
            resp = c.hello(pb.HelloRequest(node_id="cli-node", bundle_id=bundle_id))
        assert resp.accepted and resp.cloud_bundle_id == bundle_id
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log.seek(0)
    assert rc == 0, log.read()
