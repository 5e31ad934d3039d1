"""grpc.health.v1 for the cloud: the Check that Kubernetes' gRPC probe and grpc_health_probe call.

Serve's gRPC proxy routes `/grpc.health.v1.Health/Check`, like every RPC, to the ingress method of
the same name (`Ingress.Check`), once `add_HealthServicer_to_server` is listed in
`grpc_servicer_functions` (deploy/serve_config.yaml). With one application no `application`
metadata is needed, so a bare probe reaches it.

The messages are the standard grpc/health/v1/health.proto (Check only: Watch answers UNIMPLEMENTED,
which the spec allows), built here from a descriptor rather than compiled by protoc. They live in a
private descriptor pool, so a process that also imports grpcio-health-checking's `health_pb2` has no
clash, and their `__module__` is this module, so the proxy can pickle a request to the ingress.

Verdict (`Readiness`): the ingress answering at all means its pipeline is built (bundle loaded), the
same condition `Hello` rests on; on top of that each downstream deployment must answer a cheap call
(no model run) within `timeout_s`. Redis is not asked: the service runs without it (cloud_service.cache).
This module imports only grpc and protobuf (and cloud_service.lenient, which imports no more), so
`splitclip cloud probe` (`probe`) starts fast.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cloud_service.lenient import add_service

log = logging.getLogger("splitclip.cloud.health")

PACKAGE = "grpc.health.v1"
SERVICE_NAME = f"{PACKAGE}.Health"
CHECK_METHOD = f"/{SERVICE_NAME}/Check"
SPLITCLIP_SERVICE = "splitclip.v1.SplitClip"  # protos/splitclip.proto
KNOWN_SERVICES = ("", SPLITCLIP_SERVICE)  # "" = the server as a whole
DOWNSTREAM_TIMEOUT_S = 2.0  # per downstream call; a probe's own timeout should be longer (docs/cloud.md)
VERDICT_TTL_S = 1.0  # checks within this long of the last round reuse its verdict


def _file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/health/v1/health.proto, as protoc would describe it (without Watch)."""
    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package=PACKAGE, syntax="proto3"
    )
    f.message_type.add(name="HealthCheckRequest").field.add(
        name="service", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, json_name="service"
    )
    response = f.message_type.add(name="HealthCheckResponse")
    statuses = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        statuses.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=F.TYPE_ENUM,
        type_name=f".{PACKAGE}.HealthCheckResponse.ServingStatus",
        label=F.LABEL_OPTIONAL,
        json_name="status",
    )
    f.service.add(name="Health").method.add(
        name="Check",
        input_type=f".{PACKAGE}.HealthCheckRequest",
        output_type=f".{PACKAGE}.HealthCheckResponse",
    )
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
DESCRIPTOR = _POOL.FindFileByName("grpc/health/v1/health.proto")


def _message_class(name: str) -> Any:
    cls = message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name[name])
    cls.__module__, cls.__qualname__ = __name__, name  # pickled by reference to this module
    return cls


HealthCheckRequest = _message_class("HealthCheckRequest")
HealthCheckResponse = _message_class("HealthCheckResponse")
SERVING: int = HealthCheckResponse.SERVING
NOT_SERVING: int = HealthCheckResponse.NOT_SERVING


def status_name(status: int) -> str:
    return str(HealthCheckResponse.ServingStatus.Name(status))


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:
    """Register grpc.health.v1.Health on `server`, as generated `add_*Servicer_to_server` do (Serve's
    proxy passes a placeholder servicer and replaces every handler with its route to the ingress);
    requests parse leniently (cloud_service.lenient)."""
    messages = {"HealthCheckRequest": HealthCheckRequest, "HealthCheckResponse": HealthCheckResponse}
    add_service(servicer, server, DESCRIPTOR.services_by_name["Health"], messages)


class UnknownService(LookupError):
    """Check for a service this server does not serve (the ingress answers NOT_FOUND, as the spec says)."""

    def __init__(self, service: str, known_services: Iterable[str] = KNOWN_SERVICES) -> None:
        known = ", ".join(repr(s) for s in sorted(known_services))
        super().__init__(f"unknown service {service!r} for health checks (known: {known})")


DownstreamCall = Callable[[], Awaitable[object]]


class Readiness:
    """SERVING while every downstream deployment answers its cheap call within `timeout_s`.

    A verdict is kept for `ttl_s` and concurrent checks share one round, so probes from many kubelets
    and proxies cost the deployments at most one call each per `ttl_s`. State changes are logged once.
    """

    def __init__(
        self,
        downstream: Mapping[str, DownstreamCall],
        *,
        services: Iterable[str] = KNOWN_SERVICES,
        timeout_s: float = DOWNSTREAM_TIMEOUT_S,
        ttl_s: float = VERDICT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.downstream = dict(downstream)
        self.services = frozenset(services)
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._verdict: int | None = None
        self._until = 0.0
        self._round: asyncio.Future[int] | None = None
        self.problems: list[str] = []  # why the last round was NOT_SERVING (empty when SERVING)
        self.rounds = 0

    async def check(self, service: str) -> Any:
        """The HealthCheckResponse for `service`; UnknownService for a name not served here."""
        if service not in self.services:
            raise UnknownService(service, self.services)
        return HealthCheckResponse(status=await self.status())

    async def status(self) -> int:
        if self._verdict is not None and self._clock() < self._until:
            return self._verdict
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(self._probe())
        return await asyncio.shield(self._round)  # a cancelled caller leaves the round to the others

    async def _probe(self) -> int:
        self.rounds += 1
        found = await asyncio.gather(*(self._ask(name, call) for name, call in self.downstream.items()))
        problems = [p for p in found if p]
        verdict = NOT_SERVING if problems else SERVING
        if verdict != self._verdict:
            if problems:
                log.warning("health: NOT_SERVING (%s)", "; ".join(problems))
            elif self._verdict is not None:
                log.warning("health: SERVING again")
        self._verdict, self._until, self.problems = verdict, self._clock() + self.ttl_s, problems
        return verdict

    async def _ask(self, name: str, call: DownstreamCall) -> str:
        async def answer() -> object:
            return await call()  # `call()` itself may raise: inside, so that counts as no answer

        try:
            await asyncio.wait_for(answer(), self.timeout_s)
        except TimeoutError:
            return f"{name}: no answer in {self.timeout_s:g} s"
        except Exception as e:
            return f"{name}: {type(e).__name__}: {e}"
        return ""


def probe(address: str, service: str = "", *, timeout_s: float = 3.0, application: str = "") -> str:
    """Call Check at `address` (insecure, like the cloud's port) and return the status name, e.g.
    "SERVING". Raises grpc.RpcError when the call fails (closed port, NOT_FOUND, deadline)."""
    metadata = (("application", application),) if application else None
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            CHECK_METHOD,
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
            _registered_method=True,
        )
        response = check(HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata)
    return status_name(response.status)
