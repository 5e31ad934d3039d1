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
SPLITCLIP_CUT                 a fixed cut k in 0..L (with SPLITCLIP_CODEC), or `auto`: with a cloud the online
                              planner picks the plan per frame (edge_node/autoplan.py). Unset: auto, unless a
                              codec is given (SPLITCLIP_CODEC or codec=), which fixes cut L // 2 with it
SPLITCLIP_ALLOW_IMAGE_UPLOAD  0: never send pixels to the cloud (a node with cut 0 and a cloud refuses to start)
SPLITCLIP_CODEC               codec preset of a fixed cut (default int8-zstd; setting it fixes the plan)
SPLITCLIP_MIN_AGREEMENT       auto: only plans with measured top-1 agreement >= this (default 0.99)
SPLITCLIP_OBJECTIVE           auto: `latency` (default) or `bytes` (fewest bytes within LATENCY_BUDGET_MS)
SPLITCLIP_LATENCY_BUDGET_MS   auto, objective bytes: the predicted latency a plan may take
SPLITCLIP_PLAN_MARGIN         auto: switch only to a plan predicted this much better (default 0.05) ...
SPLITCLIP_PLAN_PATIENCE       ... for this many frames in a row (default 3)
SPLITCLIP_CACHE_DIR           the device profile cache (default ~/.cache/splitclip)
SPLITCLIP_TOP_K               labels per result (default 5)
SPLITCLIP_FRAME_DEADLINE_S    per-frame deadline for the split path, seconds (default 5)
SPLITCLIP_WINDOW              frames in flight on the stream (default 8)
SPLITCLIP_HELLO_TIMEOUT_S     deadline of Hello / probes (default 2)
SPLITCLIP_BREAKER_FAILURES    consecutive failures that open the breaker (default 3)
SPLITCLIP_PROBE_INTERVAL_S    first probe delay after opening (default 0.5), doubling ...
SPLITCLIP_PROBE_MAX_S         ... up to this cap (default 2; keeps recovery under 5 s)
SPLITCLIP_RETRY_ATTEMPTS      attempts of a unary call on transient statuses (default 3)
SPLITCLIP_KEEPALIVE_S         HTTP/2 keepalive ping interval while calls are open (default 20)
SPLITCLIP_METRICS_PORT        `splitclip edge watch`: serve Prometheus metrics on this port (default 0:
                              off; 9464 in Kubernetes), at http://METRICS_HOST:PORT/metrics
SPLITCLIP_METRICS_HOST        the address it binds (default 0.0.0.0)

Fleet search (docs/edge.md, docs/search.md):
SPLITCLIP_INDEX               true: the cloud stores this node's frame embeddings (never pixels) with their top
                              labels, time and source, so `splitclip search` finds them (default false). Frames
                              the node answers itself go to the journal and are uploaded when the cloud is back
SPLITCLIP_JOURNAL             the offline journal (SQLite) of those frames (default:
                              CACHE_DIR/journal/<node id>--<bundle id>.sqlite). Set SPLITCLIP_NODE_ID too: the
                              default node id has the pid in it, so a restarted node would not find its journal
SPLITCLIP_JOURNAL_MAX_ENTRIES frames the journal keeps at most; beyond, new ones are dropped and counted (default 1e6)
SPLITCLIP_UPLOAD_BATCH        journal frames per Upload call (default 64; at most UPLOAD_MAX_FRAMES, 4096)
SPLITCLIP_UPLOAD_RATE_PER_S   journal frames uploaded per second at most, on average (default 200: a backlog must
                              not crowd out the live frames on a thin link)
SPLITCLIP_UPLOAD_TIMEOUT_S    deadline of one Upload call (default 10)
SPLITCLIP_UPLOAD_RETRY_S      after a failed Upload, wait this long before the next try (default 5)
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from splitclip import settings as loader
from splitclip.constants import INDEX_MAX_TEXT_CHARS, UPLOAD_MAX_FRAMES
from splitclip.settings import SettingsError

AUTO = "auto"  # SPLITCLIP_CUT / --cut value of the online planner (the same as leaving it unset)


def default_node_id() -> str:
    """The node id when SPLITCLIP_NODE_ID is unset: unique per process, so not stable across restarts."""
    return f"edge-{socket.gethostname()}-{os.getpid()}"


def cache_root(cache_dir: Path | None = None) -> Path:
    """The node's cache directory (device profiles, journals): `cache_dir` if given, else
    SPLITCLIP_CACHE_DIR, else ~/.cache/splitclip. Read at call time, so a caller without settings
    (the profiler) finds the same directory."""
    return cache_dir or Path(os.environ.get("SPLITCLIP_CACHE_DIR") or Path.home() / ".cache" / "splitclip")


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
    cut: int | None = None  # a fixed cut; None = L // 2 (plan "fixed") or the planner (plan "auto")
    plan: str = "fixed"  # "auto" (SPLITCLIP_CUT=auto / cut="auto"): chosen per frame with a cloud
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
    min_agreement: float = 0.99  # auto: the agreement floor
    objective: str = "latency"  # auto: "latency" | "bytes"
    latency_budget_ms: float = 0.0  # auto, objective bytes: required (> 0)
    plan_margin: float = 0.05
    plan_patience: int = 3
    cache_dir: Path | None = None  # None = ~/.cache/splitclip
    metrics_port: int = 0  # `splitclip edge watch`'s Prometheus endpoint; 0 = off
    metrics_host: str = "0.0.0.0"
    index: bool = False  # fleet search: the cloud stores this node's frame embeddings
    journal: Path | None = None  # the offline journal; None = journal_path()'s default
    journal_max_entries: int = 1_000_000
    upload_batch: int = 64
    upload_rate_per_s: float = 200.0
    upload_timeout_s: float = 10.0
    upload_retry_s: float = 5.0

    @property
    def auto(self) -> bool:
        """Does the online planner choose each frame's plan (auto, and a cloud to send to)?"""
        return self.plan == AUTO and self.cloud is not None

    def journal_path(self, bundle_id: str) -> Path:
        """The journal file: SPLITCLIP_JOURNAL, else one per node id and bundle under the cache dir (a
        journal holds one node's frames of one bundle, so it never uploads them under another's name)."""
        if self.journal is not None:
            return self.journal
        root = cache_root(self.cache_dir)
        node = re.sub(r"[^A-Za-z0-9._-]", "_", self.node_id)  # a file name, whatever the id holds
        return root / "journal" / f"{node}--{bundle_id}.sqlite"

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> EdgeSettings:
        """Settings from `SPLITCLIP_*` variables; keyword overrides that are not None win."""
        env = os.environ if env is None else env
        # cut "auto" is plan "auto"; a cut given as an override wins over SPLITCLIP_CUT=auto
        override_cut = overrides.get("cut")
        if str(env.get("SPLITCLIP_CUT", "")).strip().lower() == AUTO:
            env = {k: v for k, v in env.items() if k != "SPLITCLIP_CUT"}
            if override_cut is None:
                overrides = {**overrides, "plan": AUTO}
        if str(override_cut).strip().lower() == AUTO:
            overrides = {**overrides, "cut": None, "plan": AUTO}
        elif override_cut is not None:
            overrides = {**overrides, "plan": "fixed"}
        elif (
            "plan" not in overrides
            and not env.get("SPLITCLIP_CUT")
            and overrides.get("codec") is None
            and not env.get("SPLITCLIP_CODEC")
        ):
            # neither a cut nor a codec asked for: the planner chooses (with a cloud; without one the
            # node answers locally whatever the plan); a codec alone means a fixed cut L // 2 with it
            overrides = {**overrides, "plan": AUTO}
        values = loader.load(EdgeSettings, env, overrides, kind="edge")
        if "bundle" not in values and DEFAULT_BUNDLE.is_dir():
            values["bundle"] = DEFAULT_BUNDLE
        token_file = env.get("SPLITCLIP_NODE_TOKEN_FILE")
        if "node_token" not in values and token_file:
            values["node_token"] = Path(token_file).read_text().strip() or None
        s = EdgeSettings(**values)
        if not s.node_id:
            s = replace(s, node_id=default_node_id())
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
        if self.plan not in ("fixed", AUTO) or (self.plan == AUTO and self.cut is not None):
            raise SettingsError(
                f"plan must be fixed, or auto without a cut; got {self.plan!r}, cut {self.cut}"
            )
        if not 0.0 <= self.min_agreement <= 1.0:
            raise SettingsError(f"min_agreement must be in 0..1, got {self.min_agreement}")
        if self.objective not in ("latency", "bytes"):
            raise SettingsError(f"objective must be latency or bytes, got {self.objective!r}")
        if self.objective == "bytes" and self.latency_budget_ms <= 0:
            raise SettingsError("objective bytes needs latency_budget_ms > 0 (SPLITCLIP_LATENCY_BUDGET_MS)")
        if self.plan_margin < 0 or self.plan_patience < 1:
            raise SettingsError(
                f"expected plan_margin >= 0 and plan_patience >= 1, got {self.plan_margin}, {self.plan_patience}"
            )
        if not 1 <= self.upload_batch <= UPLOAD_MAX_FRAMES:  # the cloud refuses a larger Upload
            raise SettingsError(f"upload_batch must be in 1..{UPLOAD_MAX_FRAMES}, got {self.upload_batch}")
        if self.journal_max_entries < 1:
            raise SettingsError(f"journal_max_entries must be >= 1, got {self.journal_max_entries}")
        if self.index and (len(self.node_id) > INDEX_MAX_TEXT_CHARS or "\0" in self.node_id):
            # the cloud stores the node id with each frame and refuses every Upload of such an id
            raise SettingsError(
                f"index is on: node_id must be at most {INDEX_MAX_TEXT_CHARS} characters without NUL, "
                f"got {len(self.node_id)} characters"
            )
        if min(self.upload_rate_per_s, self.upload_timeout_s, self.upload_retry_s) <= 0:
            raise SettingsError(
                f"upload_rate_per_s, upload_timeout_s and upload_retry_s must be positive, got "
                f"{self.upload_rate_per_s}, {self.upload_timeout_s}, {self.upload_retry_s}"
            )
        if self.cloud is not None and ":" not in self.cloud:
            raise SettingsError(f"cloud must be HOST:PORT, got {self.cloud!r}")
