"""Link emulation for tests and benchmarks: an asyncio TCP proxy with a rate limit, delay, stall, reset and refusal.

`LinkProxy(target_host, target_port, mbps_up=..., mbps_down=..., delay_ms=...)` listens on 127.0.0.1 and
forwards bytes both ways over real sockets, so gRPC/HTTP2 flow control and TCP backpressure run for
real. "Up" is client -> target (edge -> cloud), "down" is target -> client. Its event loop runs in
one background thread ("link-proxy"); every control method may be called from any other thread and
has taken effect when it returns.

The link model, per direction: bytes read from one side queue for the link (at most `buffer_bytes`
per direction are held; beyond that the proxy stops reading, which backs the sender up through TCP),
are serialised at the rate (a token bucket of `burst_bytes`, in pieces of about 5 ms of link time)
and then propagate for `delay_ms` before they are written to the other side, in order. A setting
changed mid-run applies to bytes not yet forwarded: a new rate to what is not yet serialised, a new
delay to what is not yet written.

Faults:
- `stall()` / `resume()`: the proxy stops reading and writing; nothing is closed (no FIN, no RST),
  so the peers see silence, like a dead Wi-Fi. Held bytes flow again on `resume()`.
- `reset()`: every open connection is aborted with RST (SO_LINGER 0) on both sides; new ones are
  still accepted.
- `refuse()`: the listener closes (new connections are refused; open ones carry on; add `reset()`
  for a cloud that is gone); `accept()` listens again on the same port.

`python -m benchmarks.link --target HOST:PORT --mbps 10 --delay-ms 20` runs one until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

HOST = "127.0.0.1"
PIECE_S = 0.005  # a rate-limited chunk is serialised in pieces of about this much link time ...
MIN_PIECE = 1500  # ... but at least one Ethernet frame's worth of bytes
CONTROL_TIMEOUT_S = 10.0  # how long a control call waits for the proxy's loop


class _Keep(Enum):
    KEEP = 0


KEEP = _Keep.KEEP  # set(): leave this setting as it is


@dataclass(frozen=True)
class LinkSettings:
    mbps_up: float | None = None  # client -> target, Mbit/s (10**6 bit/s); None = unlimited
    mbps_down: float | None = None  # target -> client
    delay_ms: float = 0.0  # one-way propagation delay, each direction (RTT adds 2x this)

    def validate(self) -> None:
        for name in ("mbps_up", "mbps_down"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None (unlimited), got {v!r}")
        if not self.delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms!r}")

    def rate(self, up: bool) -> float | None:
        """Bytes per second in that direction, or None (unlimited)."""
        mbps = self.mbps_up if up else self.mbps_down
        return None if mbps is None else mbps * 1e6 / 8


@dataclass(frozen=True)
class LinkStats:
    bytes_up: int  # bytes written to the target (forwarded client -> target)
    bytes_down: int  # bytes written to clients
    connections: int  # connections accepted so far
    open_connections: int  # connections open now


async def _nap(event: asyncio.Event, timeout: float | None) -> None:
    """Wait until `event` is set or `timeout` seconds pass (None: no limit)."""
    if timeout is not None and timeout <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def _set_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Pipe:
    """One direction of one connection: read -> serialise at the rate -> propagate -> write."""

    def __init__(
        self, proxy: LinkProxy, conn: _Conn, up: bool, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        self.proxy, self.conn, self.up = proxy, conn, up
        self.src, self.dst = src, dst
        self.pending: collections.deque[bytes | None] = collections.deque()  # to serialise; None = EOF
        self.air: collections.deque[tuple[float, bytes | None]] = (
            collections.deque()
        )  # (serialised at, bytes)
        self.buffered = 0  # bytes read and not yet written
        self.tokens = float(proxy.burst_bytes)
        self.t_tokens = time.monotonic()
        self.ev_read, self.ev_link, self.ev_send = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def poke(self) -> None:
        self.ev_read.set()
        self.ev_link.set()
        self.ev_send.set()

    async def read_loop(self) -> None:
        p = self.proxy
        while True:
            self.ev_read.clear()
            if p._stalled or self.buffered >= p.buffer_bytes:
                await _nap(self.ev_read, None)
                continue
            data = await self.src.read(p.chunk_bytes)
            self.pending.append(data or None)
            self.buffered += len(data)
            self.ev_link.set()
            if not data:
                return

    def _refill(self, rate: float) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.proxy.burst_bytes), self.tokens + (now - self.t_tokens) * rate)
        self.t_tokens = now

    async def link_loop(self) -> None:
        p = self.proxy
        while True:
            self.ev_link.clear()
            if p._stalled or not self.pending:
                await _nap(self.ev_link, None)
                continue
            item = self.pending[0]
            rate = p._settings.rate(self.up)
            if item is None or rate is None:
                self.pending.popleft()
                self.tokens, self.t_tokens = float(p.burst_bytes), time.monotonic()
                self.air.append((time.monotonic(), item))
                self.ev_send.set()
                if item is None:
                    return
                continue
            self._refill(rate)
            n = min(len(item), max(MIN_PIECE, int(rate * PIECE_S)))
            piece = item[:n]
            if n < len(item):
                self.pending[0] = item[n:]
            else:
                self.pending.popleft()
            self.tokens -= n
            while self.tokens < 0:  # the piece is on the wire until its debt is paid, at the rate of now
                self.ev_link.clear()
                await _nap(self.ev_link, -self.tokens / rate)
                new_rate = p._settings.rate(self.up)
                if new_rate is None:
                    self.tokens = float(p.burst_bytes)
                    break
                rate = new_rate
                self._refill(rate)
            self.air.append((time.monotonic(), piece))
            self.ev_send.set()

    async def send_loop(self) -> None:
        p = self.proxy
        while True:
            self.ev_send.clear()
            if p._stalled or not self.air:
                await _nap(self.ev_send, None)
                continue
            at, piece = self.air[0]
            due = at + p._settings.delay_ms / 1e3 - time.monotonic()  # the delay of now
            if due > 0:
                await _nap(self.ev_send, due)
                continue
            self.air.popleft()
            if piece is None:
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                return
            self.dst.write(piece)
            p._count(self.up, len(piece))
            await self.dst.drain()
            self.buffered -= len(piece)
            self.ev_read.set()


class _Conn:
    def __init__(self, proxy: LinkProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = reader, writer
        self.t_writer: asyncio.StreamWriter | None = None
        self.pipes: list[_Pipe] = []
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.c_writer, self.t_writer) if w is not None]

    async def run(self) -> None:
        p = self.proxy
        try:
            while p._stalled:  # silence: the target hears of this connection only once the link is back
                await _nap(p._resumed, None)
            try:
                t_reader, self.t_writer = await asyncio.open_connection(
                    p.target_host, p.target_port, limit=p.chunk_bytes
                )
            except OSError:  # the target is down: the client sees a reset, as without the proxy
                self.abort(rst=True)
                return
            for w in self.writers():
                w.transport.set_write_buffer_limits(high=p.chunk_bytes)
            self.pipes = [
                _Pipe(p, self, True, self.c_reader, self.t_writer),
                _Pipe(p, self, False, t_reader, self.c_writer),
            ]
            try:
                async with asyncio.TaskGroup() as tg:
                    for pipe in self.pipes:
                        tg.create_task(pipe.read_loop())
                        tg.create_task(pipe.link_loop())
                        tg.create_task(pipe.send_loop())
            except* OSError:  # one side reset or broke: so does the other
                self.abort(rst=True)
            self.close()
        finally:
            p._conns.discard(self)
            p._count_open(len(p._conns))

    def poke(self) -> None:
        for pipe in self.pipes:
            pipe.poke()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for w in self.writers():
                w.close()

    def abort(self, *, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for w in self.writers():
            if rst:
                _set_rst(w)
            w.transport.abort()


class LinkProxy:
    """A TCP proxy 127.0.0.1:port -> target with an emulated link; see the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        mbps_up: float | None = None,
        mbps_down: float | None = None,
        delay_ms: float = 0.0,
        port: int = 0,
        burst_bytes: int = 16 << 10,
        buffer_bytes: int = 4 << 20,
        chunk_bytes: int = 64 << 10,
    ) -> None:
        self.target_host, self.target_port = target_host, int(target_port)
        self._settings = LinkSettings(mbps_up, mbps_down, float(delay_ms))
        self._settings.validate()
        if min(burst_bytes, buffer_bytes, chunk_bytes) < 1:
            raise ValueError("burst_bytes, buffer_bytes and chunk_bytes must be >= 1")
        self.burst_bytes, self.buffer_bytes, self.chunk_bytes = burst_bytes, buffer_bytes, chunk_bytes
        self.port = port
        self._lock = threading.Lock()  # guards the counters and _settings replacement
        self._bytes = [0, 0]  # [up, down]
        self._connections = 0
        self._open = 0
        self._stalled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._stopping: asyncio.Event | None = None
        self._resumed: asyncio.Event = asyncio.Event()  # replaced on the loop in _main

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> LinkProxy:
        if self._thread is not None:
            raise RuntimeError("LinkProxy already started")
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failed), name="link-proxy", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            self._thread = None
            raise failed[0]
        return self

    def stop(self) -> None:
        """Close every connection and the listener, stop the loop and join its thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already gone
            loop.call_soon_threadsafe(stopping.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- controls (any thread) -------------------------------------------------------------------
    @property
    def settings(self) -> LinkSettings:
        with self._lock:
            return self._settings

    def set(
        self,
        *,
        mbps_up: float | _Keep | None = KEEP,
        mbps_down: float | _Keep | None = KEEP,
        delay_ms: float | _Keep = KEEP,
    ) -> LinkSettings:
        """Change the link now; applies to bytes not yet forwarded. Returns the new settings."""
        changes: dict[str, Any] = {
            k: v
            for k, v in (("mbps_up", mbps_up), ("mbps_down", mbps_down), ("delay_ms", delay_ms))
            if v is not KEEP
        }
        with self._lock:
            new = replace(self._settings, **changes)
            new.validate()
            self._settings = new
        if self._loop is not None:
            self._control(self._poke)
        return new

    def stall(self) -> None:
        """Stop forwarding, closing nothing: the peers see silence."""
        self._control(self._set_stalled, True)

    def resume(self) -> None:
        self._control(self._set_stalled, False)

    @property
    def stalled(self) -> bool:
        return self._stalled

    def reset(self) -> None:
        """Abort every open connection with RST, both sides; the listener stays as it is."""
        self._control(self._reset)

    def refuse(self) -> None:
        """Close the listener: new connections are refused (open ones carry on)."""
        self._control(self._refuse)

    def accept(self) -> None:
        """Listen again, on the same port."""
        self._control(self._listen)

    # -- counters (any thread) -------------------------------------------------------------------
    def stats(self) -> LinkStats:
        with self._lock:
            return LinkStats(self._bytes[0], self._bytes[1], self._connections, self._open)

    @property
    def bytes_up(self) -> int:
        return self.stats().bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats().bytes_down

    @property
    def connections(self) -> int:
        return self.stats().connections

    @property
    def open_connections(self) -> int:
        return self.stats().open_connections

    # -- the loop thread -------------------------------------------------------------------------
    def _control(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` (awaited if it is a coroutine function) on the loop and wait for it."""
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("LinkProxy is not running")
        if self._thread is threading.current_thread():
            raise RuntimeError("LinkProxy controls are for other threads than its own")

        async def call() -> None:
            out = fn(*args)
            if asyncio.iscoroutine(out):
                await out

        asyncio.run_coroutine_threadsafe(call(), loop).result(CONTROL_TIMEOUT_S)

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as e:
            if not ready.is_set():
                failed.append(e)
        finally:
            ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            self._loop = None
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        await self._listen()
        self._loop = asyncio.get_running_loop()
        ready.set()
        await self._stopping.wait()
        await self._refuse()
        conns = list(self._conns)
        for c in conns:
            c.abort(rst=False)
        tasks = [c.task for c in conns if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports close their sockets

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, HOST, self.port, limit=self.chunk_bytes, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _refuse(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._stopping is not None
        if self._stopping.is_set():
            writer.transport.abort()
            return
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        with self._lock:
            self._connections += 1
            self._open = len(self._conns)
        # a task of its own: asyncio logs a cancelled connection callback as an error, and reset() cancels
        conn.task = asyncio.create_task(conn.run())

    def _poke(self) -> None:
        for c in self._conns:
            c.poke()

    def _set_stalled(self, stalled: bool) -> None:
        self._stalled = stalled
        if stalled:
            self._resumed.clear()
        else:
            self._resumed.set()
        self._poke()

    def _reset(self) -> None:
        for c in list(self._conns):
            c.abort(rst=True)
            if c.task is not None:
                c.task.cancel()

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            self._bytes[0 if up else 1] += n

    def _count_open(self, n: int) -> None:
        with self._lock:
            self._open = n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.link", description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--port", type=int, default=0, help="port to listen on, 127.0.0.1 (default: a free one)")
    ap.add_argument("--mbps", type=float, default=None, help="rate both ways, Mbit/s (default unlimited)")
    ap.add_argument("--mbps-up", type=float, default=None)
    ap.add_argument("--mbps-down", type=float, default=None)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay each way")
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    up = a.mbps_up if a.mbps_up is not None else a.mbps
    down = a.mbps_down if a.mbps_down is not None else a.mbps
    with LinkProxy(host, int(port), mbps_up=up, mbps_down=down, delay_ms=a.delay_ms, port=a.port) as proxy:
        print(f"link {proxy.address} -> {a.target}: {proxy.settings}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
