"""bench/wanlink.py: the userspace internet link that bench/bench.py --link puts in front of the
API and PostgreSQL. It must delay data (not only the connection), share one bandwidth cap per
direction among all its connections and proxies, and count exactly the bytes it carried.

Timing asserts are lower bounds only (what the link must add at the least): a loaded machine
makes everything slower, never faster. A few seconds in all.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from wanlink import Link  # noqa: E402

MB = 1_000_000


class Server:
    """A TCP server on 127.0.0.1 running handler(conn) for each connection, in threads."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = []  # bytes each connection sent before its end, for the sink
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.handler(self, conn)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def echo(server, conn):
    while data := conn.recv(65536):
        conn.sendall(data)


def sink(server, conn):
    """Read to the end, then answer how many bytes came."""
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    server.received.append(total)
    conn.sendall(b"%d" % total)


def source(size):
    """Wait for one byte (the go), then send `size` bytes and close."""
    def handler(server, conn):
        if conn.recv(1):
            conn.sendall(b"x" * size)
    return handler


@pytest.fixture
def servers():
    started = []

    def start(handler):
        started.append(Server(handler))
        return started[-1]

    yield start
    for server in started:
        server.close()


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(sock, message=b"ping"):
    """Seconds from sending `message` to having it back."""
    started = time.perf_counter()
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        got += sock.recv(65536)
    assert got == message
    return time.perf_counter() - started


def read_all(sock):
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_a_request_waits_one_rtt_more_and_a_new_connection_one_more(servers):
    server = servers(echo)
    with connect(server.port) as direct:
        exchange(direct)
        direct_time = min(exchange(direct) for _ in range(3))
    with Link(rtt_ms=100, mbit=None) as link:
        port = link.proxy("127.0.0.1", server.port)
        with connect(port) as sock:
            first = exchange(sock)  # SYN and SYN-ACK, then the request and its answer
            kept_alive = [exchange(sock) for _ in range(3)]
        counts = link.snapshot()
    assert first >= 0.2 + direct_time
    assert min(kept_alive) >= 0.1 + direct_time, kept_alive
    # Counted: 4 pings each way, one connection, 4 turns (the client spoke after an answer).
    assert counts == {"up": 16, "down": 16, "connections": 1, "turns": 4}


def test_a_2_mb_transfer_at_8_mbit_takes_2_seconds_and_is_counted_exactly(servers):
    down = servers(source(2 * MB))
    up = servers(sink)
    with Link(rtt_ms=20, mbit=8) as link:
        down_port, up_port = link.proxy("127.0.0.1", down.port), link.proxy("127.0.0.1", up.port)
        with connect(down_port) as sock:
            started = time.perf_counter()
            sock.sendall(b"g")
            data = read_all(sock)
            download = time.perf_counter() - started
        assert len(data) == 2 * MB
        with connect(up_port) as sock:
            started = time.perf_counter()
            sock.sendall(b"y" * 2 * MB)
            sock.shutdown(socket.SHUT_WR)  # the end of the upload crosses the link too
            answer = read_all(sock)
            upload = time.perf_counter() - started
        assert answer == b"2000000" and up.received == [2 * MB]
        link_counts = link.snapshot()
        down_counts, up_counts = link.snapshot(down_port), link.snapshot(up_port)
    # 2 MB = 16 Mbit at 8 Mbit/s: 2 s on the wire, plus the delays (on a new connection: the
    # handshake's RTT, then the go or the upload one way and the answer the other).
    assert download >= 2.0 + 2 * 0.02, download
    assert upload >= 2.0 + 2 * 0.02, upload
    assert down_counts == {"up": 1, "down": 2 * MB, "connections": 1, "turns": 1}
    assert up_counts == {"up": 2 * MB, "down": 7, "connections": 1, "turns": 1}
    assert link_counts == {"up": 2 * MB + 1, "down": 2 * MB + 7, "connections": 2, "turns": 2}


def test_connections_through_two_proxies_share_one_cap(servers):
    first, second = servers(source(MB)), servers(source(MB))
    with Link(rtt_ms=10, mbit=8) as link:
        # Alone, one megabyte takes 1 s at 8 Mbit/s.
        with connect(link.proxy("127.0.0.1", first.port)) as sock:
            started = time.perf_counter()
            sock.sendall(b"g")
            assert len(read_all(sock)) == MB
            alone = time.perf_counter() - started
        # Two at once, one through each proxy of the link (as the API and PostgreSQL).
        socks = [connect(link.proxy("127.0.0.1", s.port)) for s in (first, second)]
        done = [None, None]

        def fetch(index):
            done[index] = (len(read_all(socks[index])), time.perf_counter())

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
        started = time.perf_counter()
        for sock in socks:
            sock.sendall(b"g")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for sock in socks:
            sock.close()
        counts = link.snapshot()
    assert alone >= 1.0 * 0.95
    assert [d[0] for d in done] == [MB, MB]
    finished = sorted(d[1] - started for d in done)
    # Together they are 2 MB through one 8 Mbit/s wire: the later ends after 2 s, not 1 s.
    assert finished[1] >= 2.0 * 0.95, finished
    # And they take turns chunk by chunk, not connection after connection: neither gets the
    # wire to itself for its whole megabyte.
    assert finished[0] >= 1.5, finished
    assert counts["down"] == 3 * MB and counts["up"] == 3 and counts["connections"] == 3


def test_a_closed_server_closes_the_client_and_a_refused_target_is_a_closed_connection(servers):
    server = servers(source(1000))
    with Link(rtt_ms=20, mbit=100) as link:
        with connect(link.proxy("127.0.0.1", server.port)) as sock:
            sock.sendall(b"g")
            assert read_all(sock) == b"x" * 1000  # then the end of the stream, delayed too
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            nobody = unused.getsockname()[1]
        with connect(link.proxy("127.0.0.1", nobody)) as sock:
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass
