"""Typed edge settings, read from `SPLITCLIP_*` environment variables (CLI flags override them).

Parsed by splitclip.settings (the rules the cloud's settings follow too); a bad value is a one-line
SettingsError. Every field below can be set as SPLITCLIP_<FIELD>; the usual ones:

SPLITCLIP_BUNDLE              bundle directory (default: bundles/demo if it exists)
SPLITCLIP_CLOUD               cloud gRPC address HOST:PORT; unset = local only
SPLITCLIP_NODE_ID             node id sent in Hello and frames (default: edge-<hostname>-<pid>)
SPLITCLIP_NODE_TOKEN          optional bearer token, sent as gRPC metadata
SPLITCLIP_NODE_TOKEN_FILE     ... or a file holding it (a mounted secret)
SPLITCLIP_TLS_CA              PEM file of the CA: use a TLS channel instead of an insecure one
SPLITCLIP_TLS_CA_OPTIONAL     true: that file may be absent (an optional mounted Secret); then TLS
                              trusting the system's CAs, and one warning (default false: an error)
SPLITCLIP_TLS_SERVER_NAME     override the TLS target name (tests, IP addresses)
SPLITCLIP_CUT                 cut k in 0..L (default L // 2; `splitclip edge plan` says which is fastest)
SPLITCLIP_ALLOW_IMAGE_UPLOAD  0: never send pixels to the cloud (a node with cut 0 and a cloud refuses to start)
SPLITCLIP_CODEC               codec preset (default: int8-zstd)
SPLITCLIP_TOP_K               labels per result (default 5)
SPLITCLIP_FRAME_DEADLINE_S    per-frame deadline for the split path, seconds (default 5)
SPLITCLIP_WINDOW              frames in flight on the stream (default 8)
SPLITCLIP_HELLO_TIMEOUT_S     deadline of Hello / probes (default 2)
SPLITCLIP_BREAKER_FAILURES    consecutive failures that open the breaker (default 3)
SPLITCLIP_PROBE_INTERVAL_S    first probe delay after opening (default 0.5), doubling ...
SPLITCLIP_PROBE_MAX_S         ... up to this cap (default 2; keeps recovery under 5 s)
SPLITCLIP_RETRY_ATTEMPTS      attempts of a unary call on transient statuses (default 3)
SPLITCLIP_KEEPALIVE_S         HTTP/2 keepalive ping interval while calls are open (default 20)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from splitclip import settings as loader
from splitclip.settings import SettingsError

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "demo"  # built by `make demo`


@dataclass(frozen=True)
class EdgeSettings:
    bundle: Path | None = None  # bundle directory
    cloud: str | None = None  # HOST:PORT of the cloud's gRPC proxy; None = local only
    node_id: str = ""  # filled in by from_env when empty
    node_token: str | None = None  # sent as `x-splitclip-token` gRPC metadata
    tls_ca: Path | None = None  # CA bundle (PEM): TLS when set
    tls_ca_optional: bool = False  # tls_ca may be absent (an optional Secret): then TLS with the system CAs
    tls_server_name: str | None = None
    cut: int | None = None  # None = L // 2
    allow_image_upload: bool = True  # False: never send pixels (cut 0) to the cloud
    codec: str = "int8-zstd"
    top_k: int = 5
    frame_deadline_s: float = 5.0
    window: int = 8
    hello_timeout_s: float = 2.0
    breaker_failures: int = 3
    probe_interval_s: float = 0.5
    probe_max_s: float = 2.0
    retry_attempts: int = 3
    retry_backoff_s: float = 0.05  # first retry wait (exponential with full jitter)
    retry_backoff_max_s: float = 0.5
    keepalive_s: float = 20.0
    reconnect_backoff_max_s: float = 1.0  # grpc's own reconnect backoff cap (its default is 120 s)
    max_message_bytes: int = 16 << 20

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> EdgeSettings:
        """Settings from `SPLITCLIP_*` variables; keyword overrides that are not None win."""
        env = os.environ if env is None else env
        values = loader.load(EdgeSettings, env, overrides, kind="edge")
        if "bundle" not in values and DEFAULT_BUNDLE.is_dir():
            values["bundle"] = DEFAULT_BUNDLE
        token_file = env.get("SPLITCLIP_NODE_TOKEN_FILE")
        if "node_token" not in values and token_file:
            values["node_token"] = Path(token_file).read_text().strip() or None
        s = EdgeSettings(**values)
        if not s.node_id:
            s = replace(s, node_id=f"edge-{socket.gethostname()}-{os.getpid()}")
        s.validate()
        return s

    def validate(self) -> None:
        if self.window < 1:
            raise SettingsError(f"window must be >= 1, got {self.window}")
        if self.frame_deadline_s <= 0 or self.hello_timeout_s <= 0:
            raise SettingsError(
                f"deadlines must be positive, got frame_deadline_s={self.frame_deadline_s}, "
                f"hello_timeout_s={self.hello_timeout_s}"
            )
        if self.breaker_failures < 1:
            raise SettingsError(f"breaker_failures must be >= 1, got {self.breaker_failures}")
        if self.cloud is not None and ":" not in self.cloud:
            raise SettingsError(f"cloud must be HOST:PORT, got {self.cloud!r}")
