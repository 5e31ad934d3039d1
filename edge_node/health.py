"""The node's standing with the cloud: Hello, the heartbeat, probing while the breaker is open, prompt warm-up.

One thread ("edge-prober") does both background jobs: while the breaker is closed it says Hello every
`heartbeat_interval_s` the cloud gave in its last HelloResponse (the registry forgets a node after
3 intervals), with the node's mode and frames answered; while the breaker is open it sends the
probe Hello the breaker lets through and reports its outcome. `close()` stops and joins it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from edge_node.breaker import CircuitBreaker, State
from edge_node.client import CloudClient
from edge_node.local import PromptCache
from edge_node.reasons import Breaker, Outcome, Reason, Where, base, hello_refusal, is_refusal, rpc_outcome
from edge_node.settings import EdgeSettings
from splitclip import codec
from splitclip.constants import VERSION
from splitclip.prompts import PromptSet
from splitclip.wire import pb

log = logging.getLogger("splitclip.edge")

DEFAULT_HEARTBEAT_S = 10.0  # when the cloud's HelloResponse does not say (the cloud's own default)


class CloudHealth:
    def __init__(
        self,
        client: CloudClient,
        breaker: CircuitBreaker,
        settings: EdgeSettings,
        *,
        bundle_id: str,
        num_blocks: int,
        embed_dim: int,
        frames_answered: Callable[[], int],
    ) -> None:
        self.client = client
        self.breaker = breaker
        self.settings = settings
        self.bundle_id = bundle_id
        self.num_blocks = num_blocks
        self.embed_dim = embed_dim
        self._frames_answered = frames_answered
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_S
        self.hellos = 0  # Hellos sent, of every kind
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        self._last_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Say Hello once (a refusal or failure opens the breaker), then keep the node's standing."""
        refused = self.hello()
        if refused is not None:
            self.breaker.trip(refused.reason)
        self._thread = threading.Thread(target=self._run, name="edge-prober", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.breaker.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- Hello -----------------------------------------------------------------------------------
    def hello(self) -> Outcome | None:
        """Say Hello; None when the cloud accepts this node and runs our bundle, else why not."""
        req = pb.HelloRequest(
            node_id=self.settings.node_id,
            bundle_id=self.bundle_id,
            codecs=list(codec.ALL_PRESETS),
            cuts=list(range(self.num_blocks + 1)),
            version=VERSION,
            mode="split" if self.breaker.allow() else "local",
            frames_answered=self._frames_answered(),
        )
        self.hellos += 1
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        try:
            resp = self.client.hello(req, self.settings.hello_timeout_s)
        except grpc.RpcError as e:
            return self._not_usable(rpc_outcome(e, Where.HELLO))
        refused = hello_refusal(
            accepted=resp.accepted,
            cloud_bundle_id=resp.cloud_bundle_id,
            bundle_id=self.bundle_id,
            message=resp.message,
        )
        if refused is not None:
            return self._not_usable(refused)
        if resp.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = float(resp.heartbeat_interval_s)
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        self._last_reason = ""
        return None

    def _not_usable(self, o: Outcome) -> Outcome:
        if o.reason != self._last_reason:  # once per distinct reason, not once per probe
            self._last_reason = o.reason
            level = (
                logging.WARNING
                if base(o.reason) in (Reason.BUNDLE_MISMATCH, Reason.UNAUTHENTICATED)
                else logging.INFO
            )
            log.log(level, "cloud %s not usable (%s): answering locally", self.settings.cloud, o.reason)
        return o

    # -- the background thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.breaker.seconds_to_probe()
            if wait is None:  # closed: heartbeat when due
                left = self._next_heartbeat - time.monotonic()
                if left > 0 or not self.breaker.allow():
                    self.breaker.wait_change(min(max(left, 0.05), 1.0))
                    continue
                self._heartbeat()
            elif wait > 0:
                self.breaker.wait_change(min(wait, 1.0))
            elif self.breaker.try_probe():
                refused = self.hello()
                if refused is None:
                    self.breaker.probe_succeeded()
                else:
                    self.breaker.probe_failed(refused.reason)

    def _heartbeat(self) -> None:
        o = self.hello()
        if o is None:
            return
        if o.breaker is Breaker.TRIP:  # e.g. the cloud was redeployed with another bundle
            self.breaker.trip(o.reason)
        else:
            self.breaker.record_failure(o.reason)

    # -- prompts ---------------------------------------------------------------------------------
    def warm_prompts(self, prompts: PromptSet, cache: PromptCache) -> None:
        """Fill the local prompt cache from the cloud's EncodeText while it is reachable (same bundle,
        checked by Hello); otherwise the local text tower fills it on first local use."""
        if not self.breaker.allow() or cache.get(prompts.key()) is not None:
            return
        try:
            resp = self.client.encode_text(
                pb.TextRequest(
                    node_id=self.settings.node_id,
                    bundle_id=self.bundle_id,
                    prompts=prompts.labels,
                    templates=prompts.templates,
                ),
                self.settings.hello_timeout_s,
            )
        except grpc.RpcError as e:
            reason = rpc_outcome(e, Where.UNARY).reason
            log.info("EncodeText failed (%s); prompt embeddings will be computed locally", reason)
            return
        if resp.bundle_id != self.bundle_id or resp.dim != self.embed_dim:
            return
        emb = np.frombuffer(resp.embeddings, dtype="<f4").reshape(len(prompts.labels), resp.dim)  # [n, dim]
        cache.put(prompts.key(), emb)


def log_breaker_change(cloud: str | None, old: State, new: State, reason: str) -> None:
    if new is State.OPEN and old is State.CLOSED:
        # a refused node or another bundle was already logged once by CloudHealth.hello
        level = logging.INFO if is_refusal(reason) else logging.WARNING
        log.log(level, "cloud %s: circuit open (%s); answering locally", cloud, reason)
    elif new is State.CLOSED:
        log.warning("cloud %s: circuit closed; back to split mode", cloud)
