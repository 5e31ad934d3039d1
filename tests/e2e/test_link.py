"""benchmarks/link.LinkProxy over plain TCP: bytes intact, rate and delay applied and changeable mid-run, stall, reset, refusal, clean stop."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.link import LinkProxy, LinkSettings

MB = 1e6 / 8  # bytes per second at 1 Mbit/s


class Echo:
    """A threaded TCP echo server on 127.0.0.1; records how each of its connections ended."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ends: list[str] = []  # "eof" | "reset" per connection
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            t = threading.Thread(target=self._serve, args=(c,), name="echo-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        try:
            while data := c.recv(65536):
                c.sendall(data)
            self.ends.append("eof")
            c.shutdown(socket.SHUT_WR)
        except ConnectionResetError:
            self.ends.append("reset")
        except OSError:
            self.ends.append("closed")
        finally:
            c.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


def connect(proxy: LinkProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def transfer(proxy: LinkProxy, data: bytes, *, on_progress=None) -> tuple[bytes, float]:
    """Send `data` through the proxy to the echo server and read it all back; (bytes back, seconds)."""
    s = connect(proxy)
    t0 = time.monotonic()

    def send() -> None:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
        if on_progress is not None:
            on_progress(len(got), time.monotonic() - t0)
    elapsed = time.monotonic() - t0
    sender.join()
    s.close()
    return bytes(got), elapsed


def rtt(s: socket.socket) -> float:
    t0 = time.monotonic()
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    return time.monotonic() - t0


def test_bytes_arrive_intact_both_ways_and_are_counted(echo: Echo) -> None:
    data = os.urandom(3 << 20)
    with LinkProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.address == f"127.0.0.1:{proxy.port}" and proxy.port > 0
        back, _ = transfer(proxy, data)
        assert back == data
        again, _ = transfer(proxy, data[:1000])
        assert again == data[:1000]
        st = proxy.stats()
    assert (st.bytes_up, st.bytes_down, st.connections) == (len(data) + 1000,) * 2 + (2,)
    assert echo.ends == ["eof", "eof"]  # FINs were forwarded


@pytest.mark.parametrize("direction", ["up", "down"])
def test_the_rate_limit_limits_each_direction(echo: Echo, direction: str) -> None:
    n = 150_000  # 1.2 s at 1 Mbit/s
    mbps = {"mbps_up": 1.0} if direction == "up" else {"mbps_down": 1.0}
    with LinkProxy("127.0.0.1", echo.port, **mbps) as proxy:
        back, took = transfer(proxy, os.urandom(n))
    ideal = n / MB
    assert len(back) == n
    assert 0.6 * ideal <= took <= 3 * ideal, (took, ideal)


def test_the_delay_is_one_way_per_direction_and_combines_with_the_rate(echo: Echo) -> None:
    with LinkProxy("127.0.0.1", echo.port, delay_ms=150) as proxy:
        s = connect(proxy)
        rtts = [rtt(s) for _ in range(2)]
        s.close()
        assert all(0.6 * 0.3 <= r <= 3 * 0.3 for r in rtts), rtts
        proxy.set(mbps_up=2.0, delay_ms=100)
        n = 100_000
        back, took = transfer(proxy, os.urandom(n))
    ideal = n / (2 * MB) + 2 * 0.1  # serialisation at 2 Mbit/s, then 100 ms each way
    assert len(back) == n
    assert 0.6 * ideal <= took <= 3 * ideal, (took, ideal)


def test_a_rate_changed_mid_transfer_applies_to_the_bytes_not_yet_forwarded(echo: Echo) -> None:
    n = 400_000  # 6.4 s at 0.5 Mbit/s, 0.03 s unlimited
    with LinkProxy("127.0.0.1", echo.port, mbps_up=0.5) as proxy:
        timer = threading.Timer(0.6, lambda: proxy.set(mbps_up=None))
        timer.start()
        back, took = transfer(proxy, os.urandom(n))
        timer.join()
        assert len(back) == n and 0.5 <= took <= 2.5, took  # sped up after 0.6 s

        seen: list[tuple[int, float]] = []
        changed = threading.Event()

        def slow_down(got: int, at: float) -> None:
            seen.append((got, at))
            if got > 100_000 and not changed.is_set():
                changed.set()
                proxy.set(mbps_up=2.0)

        proxy.set(mbps_up=20.0)  # 2.5 MB/s, then 0.25 MB/s once 100 kB are back
        back, took = transfer(proxy, os.urandom(500_000), on_progress=slow_down)
    assert len(back) == 500_000
    after = [(g, t) for g, t in seen if g > 100_000]
    (g0, t0), (g1, t1) = after[0], after[-1]
    rate = (g1 - g0) / (t1 - t0)  # what came back after the change
    assert 0.6 * 2 * MB <= rate <= 3 * 2 * MB, rate


def test_a_delay_changed_mid_run_applies_to_bytes_still_in_the_air(echo: Echo) -> None:
    with LinkProxy("127.0.0.1", echo.port, delay_ms=1500) as proxy:
        s = connect(proxy)
        t0 = time.monotonic()
        s.sendall(b"x")
        time.sleep(0.2)
        proxy.set(delay_ms=0)
        assert s.recv(1) == b"x"
        assert time.monotonic() - t0 < 1.2  # not the 3 s it was set to when sent
        proxy.set(delay_ms=200)
        assert 0.6 * 0.4 <= rtt(s) <= 3 * 0.4
        s.close()


def test_stall_is_silence_and_resume_delivers_what_was_held(echo: Echo) -> None:
    with LinkProxy("127.0.0.1", echo.port) as proxy:
        s = connect(proxy)
        assert rtt(s) < 1.0
        proxy.stall()
        assert proxy.stalled
        s.sendall(b"held")
        s.settimeout(0.6)
        with pytest.raises(TimeoutError):  # no data, no FIN (b""), no RST: silence
            s.recv(16)
        late = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # a new one is silent too
        late.sendall(b"y")
        late.settimeout(0.3)
        with pytest.raises(TimeoutError):
            late.recv(1)
        assert echo.ends == []
        proxy.resume()
        s.settimeout(5)
        got = b""
        while len(got) < 4:
            got += s.recv(16)
        assert got == b"held"
        late.settimeout(5)
        assert late.recv(1) == b"y"
        s.close()
        late.close()


def test_reset_sends_rst_both_ways_and_new_connections_still_work(echo: Echo) -> None:
    with LinkProxy("127.0.0.1", echo.port) as proxy:
        s = connect(proxy)
        assert rtt(s) < 1.0
        assert proxy.open_connections == 1
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            s.sendall(b"z")
            s.recv(1)
        s.close()
        until = time.monotonic() + 5
        while echo.ends != ["reset"]:
            assert time.monotonic() < until, echo.ends
            time.sleep(0.02)
        s2 = connect(proxy)
        assert rtt(s2) < 1.0
        s2.close()
        assert proxy.connections == 2


def test_refuse_closes_the_listener_and_accept_reopens_it_on_the_same_port(echo: Echo) -> None:
    with LinkProxy("127.0.0.1", echo.port) as proxy:
        port = proxy.port
        s = connect(proxy)
        assert rtt(s) < 1.0  # accepted (a connection still in the backlog would go with the listener)
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert rtt(s) < 1.0  # an open connection carries on
        proxy.accept()
        assert proxy.port == port
        s2 = connect(proxy)
        assert rtt(s2) < 1.0
        s.close()
        s2.close()


def test_a_target_that_is_down_gives_the_client_a_reset() -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with (
        LinkProxy("127.0.0.1", port) as proxy,
        pytest.raises(ConnectionResetError),  # on connect or on the first read, as the race goes
        connect(proxy) as s,
    ):
        s.settimeout(5)
        s.recv(1)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="mbps_up"):
        LinkProxy("127.0.0.1", 1, mbps_up=0)
    p = LinkProxy("127.0.0.1", 1, delay_ms=5)
    with pytest.raises(ValueError, match="delay_ms"):
        p.set(delay_ms=-1)
    assert p.set(mbps_down=3) == LinkSettings(None, 3, 5.0)  # before start: just stored
    with pytest.raises(RuntimeError):
        p.stall()


def test_stop_closes_every_connection_and_leaves_no_thread_or_socket(echo: Echo) -> None:
    threads = set(threading.enumerate())
    fds = len(os.listdir("/proc/self/fd"))
    proxy = LinkProxy("127.0.0.1", echo.port, delay_ms=5, mbps_down=50).start()
    s = connect(proxy)
    assert rtt(s) < 1.0
    proxy.stall()  # stopping a stalled proxy still ends
    proxy.stop()
    proxy.stop()  # idempotent
    s.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(1) == b""
    s.close()
    until = time.monotonic() + 5
    while set(threading.enumerate()) != threads:  # the echo server's own thread ends as it sees EOF
        assert time.monotonic() < until, f"threads left: {set(threading.enumerate()) - threads}"
        time.sleep(0.02)
    until = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) > fds:  # the echo server closes its end as it sees ours go
        assert time.monotonic() < until, "a socket was left open"
        time.sleep(0.02)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
