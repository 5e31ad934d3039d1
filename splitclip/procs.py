"""Process sessions on Linux: the cloud, the cluster's nodes and the demo each run in a session of
their own, and Ray puts every worker in a process group of its own, so a session (not a group) is
what holds all of one of them."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import socket
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


_issued: set[int] = set()


@functools.cache
def _port_range() -> range:
    """20000 up to the kernel's ephemeral range (read once; 32768 where /proc does not say)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return range(20000, max(low, 20001))


def free_port() -> int:
    """A TCP port free on every interface now, chosen below the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` lies in the ephemeral range, where any outgoing
    connection or another process's `bind(0)` (Ray starts dozens) may take it before our server
    binds it; a CI run lost a Serve proxy that way. Below that range only explicit binds compete,
    and the range 20000 up also stays clear of Ray's worker ports (10002-19999)."""
    ports = _port_range()
    for _ in range(200):
        port = random.choice(ports)
        if port in _issued:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _issued.add(port)
        return port
    raise OSError(f"no free TCP port in {ports.start}-{ports.stop - 1}")
