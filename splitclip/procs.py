"""Process sessions on Linux: the cloud, the cluster's nodes and the demo each run in a session of
their own, and Ray puts every worker in a process group of its own, so a session (not a group) is
what holds all of one of them."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])  # state ppid pgrp session ...
        if session == sid and state != "Z":
            out.append(int(d.name))
    return out


def signal_session(sid: int, sig: signal.Signals) -> None:
    """Send `sig` to every live process of a session (those already gone are skipped)."""
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
