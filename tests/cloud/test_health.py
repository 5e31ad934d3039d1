"""grpc.health.v1 Check: through Serve's real gRPC proxy to the ingress (one local Ray for the module,
conftest.cloud), `splitclip cloud probe` as a subprocess, and the readiness verdict on its own.

The last proxy test kills a downstream replica (Serve replaces it), so it runs last among them. The
verdict tests at the bottom give `Readiness` fake downstream calls for what a real app cannot be made
to show on demand: a call that never answers, and verdict reuse over a controlled clock.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import ray

from cloud_service import health
from cloud_service.grpc_api import pb, pb_grpc
from cloud_service.health import HealthCheckRequest, HealthCheckResponse, Readiness, UnknownService
from splitclip.procs import free_port


def check(address: str, service: str = "", method: str = health.CHECK_METHOD) -> HealthCheckResponse:
    """A bare call, as Kubernetes' gRPC probe makes it: no metadata at all."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        return call(HealthCheckRequest(service=service), timeout=30)


def probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed `splitclip` command, as an exec probe runs it. (Not `python -m splitclip.cli`
    from the repository root: a stale splitclip.egg-info there would hide newer entry points.)"""
    cmd = [str(Path(sys.executable).with_name("splitclip")), "cloud", "probe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# -- through the real proxy ----------------------------------------------------------------------


def test_check_through_the_proxy_answers_serving_without_token_or_metadata(cloud):
    assert check(cloud.address).status == HealthCheckResponse.SERVING
    assert check(cloud.address, "splitclip.v1.SplitClip").status == HealthCheckResponse.SERVING
    # the same bare call to a SplitClip RPC is refused: the token is on, Check needs none
    with grpc.insecure_channel(cloud.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.SplitClipStub(channel).Hello(pb.HelloRequest(node_id="n", bundle_id="b"), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_check_of_an_unknown_service_is_not_found(cloud):
    with pytest.raises(grpc.RpcError) as info:
        check(cloud.address, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in info.value.details()


def test_watch_is_unimplemented(cloud):
    """Only Check is registered; the spec lets a server answer Watch with UNIMPLEMENTED."""
    with pytest.raises(grpc.RpcError) as info:
        check(cloud.address, method="/grpc.health.v1.Health/Watch")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_probe_client_reads_serving(cloud):
    assert health.probe(cloud.address) == "SERVING"


def test_probe_cli_exits_0_against_the_cloud(cloud):
    done = probe_cli("--address", cloud.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{cloud.address}: SERVING"


def test_probe_cli_exits_1_naming_an_unknown_service(cloud):
    done = probe_cli("--address", cloud.address, "--service", "no.such.Service")
    assert done.returncode == 1
    assert done.stderr.startswith(f"probe {cloud.address}: NOT_FOUND: ") and "no.such.Service" in done.stderr


def test_probe_cli_exits_1_with_one_line_against_a_closed_port():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = probe_cli("--address", address, "--timeout", "5")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"probe {address}: UNAVAILABLE: "), done.stderr


def test_a_killed_downstream_replica_is_not_serving_until_serve_replaces_it(cloud):
    """A real fault: the Scorer's only replica is killed; Check answers NOT_SERVING while no Scorer
    answers, and SERVING again once Serve has started a new one."""
    assert health.probe(cloud.address) == "SERVING"
    (scorer,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Scorer#" in a["name"]]
    ray.kill(ray.get_actor(scorer["name"], namespace=scorer["namespace"]), no_restart=True)
    seen: list[str] = []
    deadline = time.monotonic() + 180  # Serve notices and starts a replica; slow on a loaded box
    while not ("NOT_SERVING" in seen and seen[-1] == "SERVING") and time.monotonic() < deadline:
        status = health.probe(cloud.address, timeout_s=30)
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.2)
    assert seen[-2:] == ["NOT_SERVING", "SERVING"], seen


# -- the verdict (fake downstream calls, see the module docstring) -------------------------------


def ok() -> asyncio.Future[object]:
    f = asyncio.get_running_loop().create_future()
    f.set_result({})
    return f


def test_serving_while_every_downstream_answers():
    r = Readiness({"VisionTail": ok, "Scorer": ok})
    assert asyncio.run(r.check("")).status == health.SERVING and r.problems == []


def test_not_serving_names_the_deployment_that_failed_or_did_not_answer():
    async def broken() -> object:
        raise RuntimeError("replica died")

    async def silent() -> object:
        await asyncio.Event().wait()  # never answers
        return None

    def unroutable() -> object:
        raise ValueError("no handle")  # the call itself raises, before anything is awaited

    r = Readiness(
        {"VisionTail": broken, "TextEncoder": silent, "Scorer": unroutable, "X": ok}, timeout_s=0.05
    )
    assert asyncio.run(r.check("splitclip.v1.SplitClip")).status == health.NOT_SERVING
    assert sorted(r.problems) == [
        "Scorer: ValueError: no handle",
        "TextEncoder: no answer in 0.05 s",
        "VisionTail: RuntimeError: replica died",
    ]


def test_unknown_service_raises_before_asking_anyone():
    calls = []
    r = Readiness({"VisionTail": lambda: calls.append(1) or ok()})
    with pytest.raises(UnknownService, match="'nope'"):
        asyncio.run(r.check("nope"))
    assert calls == [] and r.rounds == 0


def test_a_verdict_is_reused_for_ttl_and_concurrent_checks_share_one_round():
    now = [0.0]
    calls = []
    healthy = [True]

    async def tail() -> object:
        calls.append(now[0])
        await asyncio.sleep(0)  # let the other checks arrive while this round is in flight
        if not healthy[0]:
            raise RuntimeError("down")
        return {}

    r = Readiness({"VisionTail": tail}, ttl_s=1.0, clock=lambda: now[0])

    async def scenario() -> list[int]:
        out = [c.status for c in await asyncio.gather(*(r.check("") for _ in range(5)))]
        healthy[0] = False
        out.append((await r.check("")).status)  # within ttl: the cached SERVING
        now[0] = 1.5
        out.append((await r.check("")).status)  # a new round sees the failure
        return out

    assert asyncio.run(scenario()) == [health.SERVING] * 6 + [health.NOT_SERVING]
    assert calls == [0.0, 1.5] and r.rounds == 2
