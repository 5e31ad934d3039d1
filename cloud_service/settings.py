"""Typed settings of the cloud service: defaults < `SPLITCLIP_*` environment < application args.

The Serve application builder (`cloud_service.app:build`) receives the `args` of
deploy/serve_config.yaml; any key there overrides the environment, which overrides the defaults.
Both are parsed by splitclip.settings, by the rules the edge's settings follow too.
The node token is read from the environment only (a Kubernetes Secret), never from the config:
`as_args()` leaves it out of what the builder hands to the deployments, and the ingress replica
reads it back from its own environment when it loads its settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from splitclip import settings as loader
from splitclip.settings import SettingsError

__all__ = ["CloudSettings", "SettingsError"]


@dataclass(frozen=True)
class CloudSettings:
    bundle: str = ""  # bundle directory, the same bundle the edge nodes run
    redis_url: str = ""  # redis://host:port/db of the shared prompt cache + node registry; "" = no cache
    node_token: str = ""  # when set, every call must carry it (metadata x-splitclip-token or authorization)
    grpc_port: int = 0  # gRPC proxy port of `splitclip cloud` (0: the Serve config's, 9000)
    max_batch_size: int = 32  # vision tail @serve.batch size
    batch_wait_s: float = 0.002  # how long a tail @serve.batch waits for more frames after its first
    ingress_calls_inflight: int = 2  # concurrent grouped calls per ingress replica to the tail (and scorer)
    max_payload_bytes: int = 4 << 20  # bigger Frame.payload -> RESOURCE_EXHAUSTED
    max_prompts: int = 256  # labels per request
    max_prompt_chars: int = 300
    max_templates: int = 16
    tail_threads: int = 0  # ONNX Runtime intra-op threads of a vision tail replica (0 = ORT default)
    # ONNX Runtime execution providers of the vision tail, in order, comma-separated ("" = CPU), e.g.
    # CUDAExecutionProvider,CPUExecutionProvider on a GPU worker (needs onnxruntime-gpu in the image)
    ort_providers: str = ""
    text_threads: int = 1  # ONNX Runtime intra-op threads of a text encoder replica
    stream_max_inflight: int = 128  # frames of one bidi stream processed concurrently (backpressure above)
    heartbeat_interval_s: float = 10.0  # nodes re-send Hello this often; the registry TTL is 3x this
    cache_ttl_s: int = 7 * 24 * 3600  # prompt embeddings and prompt sets in Redis
    redis_timeout_s: float = 0.25  # per Redis operation; a slower Redis counts as down
    redis_retry_s: float = 1.0  # while Redis is down, try it again at most this often
    allow_image_upload: bool = True  # False: refuse cut-0 frames (the pixels) with FAILED_PRECONDITION
    # Fleet search (docs/search.md): keep the embeddings of frames sent with `index` and answer Search /
    # Upload. Off: Frame.index is ignored (counted) and Search / Upload answer FAILED_PRECONDITION.
    search: bool = False
    # PostgreSQL with pgvector of the search store; the replicas never start one: `splitclip cloud
    # --search` starts an embedded one when this is empty and passes its URL here
    pg_url: str = ""
    index_queue_rows: int = 10_000  # rows waiting for the store; beyond it frames' rows are dropped (counted)
    index_batch_rows: int = 256  # rows per COPY into the store

    @staticmethod
    def load(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> CloudSettings:
        if args and "node_token" in args:
            raise SettingsError("node_token comes from SPLITCLIP_NODE_TOKEN only, not from the config")
        settings = CloudSettings(**loader.load(CloudSettings, env, args, kind="cloud"))
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise SettingsError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_s < 0:
            raise SettingsError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        for name in ("max_payload_bytes", "max_prompts", "max_prompt_chars", "max_templates"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ingress_calls_inflight < 1:
            raise SettingsError(f"ingress_calls_inflight must be >= 1, got {self.ingress_calls_inflight}")
        if self.stream_max_inflight < 1:
            raise SettingsError(f"stream_max_inflight must be >= 1, got {self.stream_max_inflight}")
        if self.heartbeat_interval_s <= 0:
            raise SettingsError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        for name in ("index_queue_rows", "index_batch_rows"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.grpc_port < 65536:
            raise SettingsError(f"grpc_port must be in 0..65535, got {self.grpc_port}")

    def as_args(self) -> dict[str, Any]:
        """Everything but the token, for passing to deployments (which re-read the token from env)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "node_token"}
