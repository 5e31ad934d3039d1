"""`splitclip cloud --search` as a process (demo/cloudproc, tiny bundle): with no SPLITCLIP_PG_URL it
starts an embedded PostgreSQL on --pg-data-dir, the replicas store and search through it, and a clean
stop stops that server too."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import psutil

from benchmarks.cloud_client import CloudClient
from cloud_service.grpc_api import pb
from demo.cloudproc import CloudProcess
from splitclip.bundle import load_bundle
from tests.e2e.test_edge_cloud import TOKEN, wait_answering


def postmaster_running(data_dir: Path) -> bool:
    pid_file = data_dir / "postmaster.pid"
    return pid_file.exists() and psutil.pid_exists(int(pid_file.read_text().split()[0]))


def test_splitclip_cloud_search_starts_and_stops_its_embedded_postgres(tiny_bundle_dir: Path, tmp_path: Path):
    base = Path(tempfile.mkdtemp(prefix="splitclip-cli-pg-"))
    base.chmod(0o755)  # as root the server runs as user pgserver, which must traverse it
    data_dir = base / "pg"
    manifest = load_bundle(tiny_bundle_dir).manifest
    cloud = CloudProcess(tiny_bundle_dir, log_path=tmp_path / "cloud.log", env={"SPLITCLIP_NODE_TOKEN": TOKEN},
                         search=True, pg_data_dir=data_dir)  # fmt: skip
    try:
        cloud.start()
        assert f"embedded PostgreSQL in {data_dir}" in cloud.log_path.read_text()
        assert postmaster_running(data_dir)
        wait_answering(cloud, manifest.bundle_id)
        emb = np.zeros(manifest.embed_dim, "<f4")
        emb[0] = 1.0
        with CloudClient(cloud.address, TOKEN) as c:
            up = pb.UploadRequest(node_id="cli", bundle_id=manifest.bundle_id,
                                  frames=[pb.IndexedFrame(frame_id=1, captured_at=1.0, embedding=emb.tobytes())])  # fmt: skip
            assert c.stub.Upload(up, metadata=c.md, timeout=60).stored == 1
            hits = c.stub.Search(pb.SearchRequest(text="a cat", k=5), metadata=c.md, timeout=60).hits
            assert [(h.node_id, h.frame_id) for h in hits] == [("cli", 1)]
    finally:
        cloud.stop()
    assert not postmaster_running(data_dir)
    shutil.rmtree(base, ignore_errors=True)
