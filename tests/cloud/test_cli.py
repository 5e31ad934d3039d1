"""`splitclip cloud` as a user runs it: a subprocess that starts Ray, an embedded Valkey and Serve,
prints the gRPC address, answers, and shuts everything down on SIGTERM. With `--search` and no
SPLITCLIP_PG_URL it also starts an embedded PostgreSQL on --pg-data-dir, the replicas store and search
through it, and the clean stop stops that server too."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
import yaml

from benchmarks.cloud_client import CloudClient
from cloud_service import cli, launch
from cloud_service.grpc_api import pb
from splitclip.bundle import load_bundle
from splitclip.procs import free_port
from tests.conftest import pg_base_dir

ROOT = Path(__file__).resolve().parents[2]


def postmaster_running(data_dir: Path) -> bool:
    pid_file = data_dir / "postmaster.pid"
    return pid_file.exists() and psutil.pid_exists(int(pid_file.read_text().split()[0]))


def test_splitclip_cloud_serves_until_sigterm(tiny_bundle_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SPLITCLIP_REDIS_URL", "SPLITCLIP_PG_URL")}
    env["SPLITCLIP_NODE_TOKEN"] = "cli-token"
    base = pg_base_dir("splitclip-cli-pg-")
    pg_dir = base / "pg"
    log = (tmp_path / "cloud.log").open("w+")
    cmd = [sys.executable, "-m", "cloud_service.cli", "--bundle", str(tiny_bundle_dir), "--port", str(port),
           "--http-port", str(free_port()), "--num-cpus", "2", "--search", "--pg-data-dir", str(pg_dir)]  # fmt: skip
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
        assert "embedded Valkey" in text and f"embedded PostgreSQL in {pg_dir}" in text
        assert postmaster_running(pg_dir)
        manifest = load_bundle(tiny_bundle_dir).manifest
        bundle_id = manifest.bundle_id
        with CloudClient(f"127.0.0.1:{port}", token="cli-token") as c:
            resp = c.hello(pb.HelloRequest(node_id="cli-node", bundle_id=bundle_id))
            assert resp.accepted and resp.cloud_bundle_id == bundle_id
            emb = np.zeros(manifest.embed_dim, "<f4")
            emb[0] = 1.0
            up = pb.UploadRequest(node_id="cli-node", bundle_id=bundle_id,
                                  frames=[pb.IndexedFrame(frame_id=1, captured_at=1.0, embedding=emb.tobytes())])  # fmt: skip
            assert c.stub.Upload(up, metadata=c.md, timeout=60).stored == 1
            hits = c.stub.Search(pb.SearchRequest(text="a cat", k=5), metadata=c.md, timeout=60).hits
            assert [(h.node_id, h.frame_id) for h in hits] == [("cli-node", 1)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log.seek(0)
    assert rc == 0, log.read()
    assert not postmaster_running(pg_dir)  # the clean stop stopped the embedded PostgreSQL too
    shutil.rmtree(base, ignore_errors=True)


def parsed(*argv: str):
    p = cli.argparse.ArgumentParser()
    cli.build_parser(p)
    return p.parse_args(list(argv))


def test_a_bad_config_stops_the_embedded_servers_it_started(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    """No Ray here: the Serve config is unusable (no applications), found after the embedded Valkey and
    PostgreSQL started; both are stopped before the error comes out."""
    monkeypatch.delenv("SPLITCLIP_REDIS_URL", raising=False)
    monkeypatch.setenv(
        "SPLITCLIP_PG_URL", ""
    )  # empty = unset; run() sets it (for the replicas), undone after
    bad = tmp_path / "serve.yaml"
    bad.write_text("proxy_location: EveryNode\n")
    base = pg_base_dir("splitclip-cli-bad-")
    pg_dir = base / "pg"
    try:
        with pytest.raises(KeyError, match="applications"):
            cli.run(parsed("--bundle", str(tiny_bundle_dir), "--config", str(bad), "--search",
                           "--pg-data-dir", str(pg_dir)))  # fmt: skip
        out = capsys.readouterr().out
        assert f"embedded PostgreSQL in {pg_dir}" in out and "shutting down" in out
        assert not postmaster_running(pg_dir)
        url = re.search(r"embedded Valkey at (\S+)", out).group(1)  # type: ignore[union-attr]
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_pg_url_goes_to_the_replicas_environment_not_into_the_serve_config(tiny_bundle_dir):
    args = parsed("--bundle", str(tiny_bundle_dir), "--search", "--pg-url", "postgresql://u:sekret@db/x")
    cfg = cli.serve_config(launch.load_config(None), args, tiny_bundle_dir, "redis://r:6379", search=True,
                           grpc_port=None)  # fmt: skip
    text = yaml.safe_dump(cfg)
    assert cfg["applications"][0]["args"]["search"] is True and "sekret" not in text and "pg_url" not in text
