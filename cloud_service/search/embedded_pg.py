"""An embedded PostgreSQL 16 + pgvector 0.6 (the `pgserver` wheel) for the search store when
SPLITCLIP_PG_URL is unset, and for tests.

pgserver runs initdb / pg_ctl from the binaries inside its wheel on a data dir, listens on a Unix
socket inside that dir only (no TCP port), and shares one server between every process that asks for
the same data dir (an inter-process lock and a list of the processes using it; the last one to let go
stops it). `url` is a libpq URL for psycopg.

Root: PostgreSQL refuses to run as root. Started by root, pgserver creates a system user `pgserver`
(`useradd`), chowns the data dir to it and runs initdb / postgres as that user. To let that user in,
it also adds o+rx to every parent directory of the data dir and of its own binaries, silently. Here
that would open root's home (/root is 0700) to every user, so as root this module checks those
parents first and refuses with one line naming the closed one instead, and the default data dir is
/var/lib/splitclip/pg rather than ~/.cache/splitclip/pg. Run as any other user (the images use uid
10001) nothing of this happens: the server runs as that user in ~/.cache/splitclip/pg.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from splitclip.errors import SplitclipError

log = logging.getLogger("splitclip.cloud.pg")

ROOT_DATA_DIR = Path("/var/lib/splitclip/pg")


class EmbeddedPgError(SplitclipError, RuntimeError):
    """The embedded PostgreSQL cannot start here; the message says why and what to do."""


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_data_dir() -> Path:
    """~/.cache/splitclip/pg, or /var/lib/splitclip/pg when running as root (see the module docstring)."""
    return ROOT_DATA_DIR if is_root() else Path.home() / ".cache" / "splitclip" / "pg"


def closed_parent(path: Path) -> Path | None:
    """The first directory above `path` that other users cannot traverse (no o+x), or None."""
    for parent in path.parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root in a container); pgserver
        # then keeps its lock file in /tmp/runtime-<uid>, which is fine
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver._commands  # type: ignore[import-untyped]

    return pgserver


class EmbeddedPostgres:
    """A real PostgreSQL server on `data_dir` (created if missing); `url` connects to it."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir or default_data_dir()).expanduser().resolve()
        self._server: Any = None

    def start(self) -> EmbeddedPostgres:
        if is_root():
            self._check_root_layout()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._server = _pgserver().get_server(self.data_dir, cleanup_mode="stop")
        except Exception as e:  # pgserver raises CalledProcessError/TimeoutExpired/AssertionError
            raise EmbeddedPgError(
                f"embedded PostgreSQL in {self.data_dir} did not start ({type(e).__name__}: {e}); "
                f"see {self.data_dir / 'log'}"
            ) from e
        log.info("embedded postgres at %s", self.url)
        return self

    def _check_root_layout(self) -> None:
        binaries = Path(_pgserver()._commands.POSTGRES_BIN_PATH)
        for what, path in (("data dir", self.data_dir), ("pgserver binaries", binaries)):
            closed = closed_parent(path)
            if closed is not None:
                raise EmbeddedPgError(
                    f"as root the embedded PostgreSQL runs as user 'pgserver', which cannot reach the {what} "
                    f"{path}: {closed} is closed to other users (mode {stat.S_IMODE(closed.stat().st_mode):04o}); "
                    f"use a data dir under an open directory (default {ROOT_DATA_DIR}), run as a non-root "
                    "user, or set SPLITCLIP_PG_URL"
                )

    @property
    def url(self) -> str:
        if self._server is None:
            raise EmbeddedPgError("embedded PostgreSQL not started")
        return str(self._server.get_uri())

    def stop(self) -> None:
        """Stop the server unless another process still uses the same data dir (then it stops last)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
