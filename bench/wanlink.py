#!/usr/bin/env python3
"""An internet link in userspace: TCP proxies on 127.0.0.1 that delay and share a bandwidth cap.

    python bench/wanlink.py --rtt 50 --mbit 50 --to 127.0.0.1:5432 [--to HOST:PORT ...]

The kernel here has no netem, so bench/bench.py puts this in front of the API and of PostgreSQL
to see what an RTT and a bandwidth cap do to the tool and to pg_dump/psql. One Link is one
path between the client and the project: every proxy opened on it (one per target, as many
connections as the clients open) shares it, so the API's traffic and PostgreSQL's compete as on
one internet link.

The model, per direction (up: client to server; down: server to client):

  - serialization: one queue per direction for the whole link. A chunk of n bytes read from a
    sender at time t starts on the wire when the wire is free (max(t, the end of the chunk
    before it, whichever connection that was)) and takes n * 8 / bandwidth seconds;
  - propagation: it is written to the receiver rtt / 2 after its last byte left;
  - connection setup: a new connection's first bytes leave one RTT after it was accepted, as
    they would after SYN and SYN-ACK (the proxy itself accepts at once on loopback). TLS, which
    Supabase's HTTPS adds on top (one more RTT with TLS 1.3), is not modelled;
  - an end of stream (FIN) travels like data, after the last byte before it.

It is an ideal pipe: no loss, no TCP slow start or congestion window (a real connection needs a
few round trips to reach the bandwidth, and again after it has been idle), bytes counted and
serialized as TCP payload (no header overhead, about 3% on full segments). Real links are
slower than this one, never faster. Each connection may hold up to `window` bytes read from its
sender and not yet delivered (by default twice the bandwidth-delay product, at least 256 KiB: as
a TCP window, enough for one connection to fill the link, and it keeps a fast sender from
queuing seconds of data ahead of the others).

It counts, per proxy and for the link, the payload bytes in each direction, the connections,
and the turns: how many times a connection's client spoke after the server had (or first), so
that a client with one request in flight makes one turn per request, and a turn costs at least
one RTT.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time

CHUNK = 16 * 1024  # bytes read from a sender at a time: the unit that competes for the wire
MIN_WINDOW = 256 * 1024
UNCAPPED_WINDOW = 8 * 1024 * 1024


class Direction:
    """One direction of the link: its wire (shared by every connection) and its counts."""

    def __init__(self, name: str, one_way: float, bits_per_second: float | None):
        self.name = name
        self.one_way = one_way
        self.bits_per_second = bits_per_second
        self.free_at = 0.0  # when the wire has sent everything queued so far (loop time)

    def schedule(self, size: int, sent: float) -> float:
        """When a chunk of `size` bytes sent at `sent` is at the far end."""
        start = max(sent, self.free_at)
        end = start + (size * 8 / self.bits_per_second if self.bits_per_second else 0.0)
        self.free_at = end
        return end + self.one_way


class Counts:
    """Payload bytes each way, connections and turns (see the module's docstring)."""

    FIELDS = ("up", "down", "connections", "turns")

    def __init__(self):
        self.up = self.down = self.connections = self.turns = 0

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


class Link:
    """A path to the project: proxies opened with .proxy() share its delay and bandwidth.

    rtt_ms: round-trip time (each direction waits half of it); mbit: the bandwidth cap in
    Mbit/s (10^6 bit/s) each way, or None for no cap; down_mbit: another cap for the download
    direction (an asymmetric line). Runs its own event loop in a thread; use as a context
    manager, or call close().
    """

    def __init__(self, rtt_ms: float, mbit: float | None, down_mbit: float | None = None,
                 window: int | None = None, connect_rtt: bool = True):
        self.rtt = rtt_ms / 1000
        self.mbit = mbit
        self.down_mbit = down_mbit if down_mbit is not None else mbit
        if window is None:
            slowest = min(m for m in (mbit, self.down_mbit) if m) if mbit or down_mbit else None
            window = max(2 * int(slowest * 1e6 / 8 * self.rtt), MIN_WINDOW) if slowest else \
                UNCAPPED_WINDOW
        self.window = window
        self.connect_rtt = connect_rtt
        self.up = Direction("up", self.rtt / 2, mbit * 1e6 if mbit else None)
        self.down = Direction("down", self.rtt / 2,
                              self.down_mbit * 1e6 if self.down_mbit else None)
        self.counts = Counts()
        self.proxies: dict[int, Counts] = {}  # listening port: its counts
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"wanlink-{rtt_ms}ms",
                                        daemon=True)
        self._thread.start()

    def __repr__(self):
        cap = f"{self.mbit:g} Mbit/s" if self.mbit else "no cap"
        if self.down_mbit != self.mbit:
            cap = f"{self.mbit:g} up / {self.down_mbit:g} down Mbit/s"
        return f"Link(RTT {self.rtt * 1000:g} ms, {cap})"

    # -- lifecycle (called from any thread)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coroutine, timeout=30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def proxy(self, host: str, port: int, listen_port: int = 0) -> int:
        """Listen on 127.0.0.1 (listen_port, or a free one) and forward every connection to
        host:port across this link. Returns the port it listens on."""
        return self._call(self._listen(host, port, listen_port))

    def close(self):
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                self._call(self._shutdown(), timeout=10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc):
        self.close()

    def snapshot(self, port: int | None = None) -> dict:
        """The counts so far, for the link or for the proxy listening on `port`."""
        with self._lock:
            return (self.counts if port is None else self.proxies[port]).snapshot()

    # -- on the loop

    async def _listen(self, host, port, listen_port):
        counts = Counts()

        async def serve(reader, writer):
            task = asyncio.current_task()
            self._tasks.add(task)
            try:
                await self._connection(reader, writer, host, port, counts)
            except asyncio.CancelledError:
                pass  # closing the link; asyncio would report a cancelled handler as an error
            finally:
                self._tasks.discard(task)

        server = await asyncio.start_server(serve, "127.0.0.1", listen_port, limit=CHUNK * 4)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        with self._lock:
            self.proxies[bound] = counts
        return bound

    async def _shutdown(self):
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def _count(self, counts: Counts, **add):
        with self._lock:
            for name, value in add.items():
                setattr(counts, name, getattr(counts, name) + value)
                setattr(self.counts, name, getattr(self.counts, name) + value)

    async def _connection(self, client_reader, client_writer, host, port, counts):
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        try:
            server_reader, server_writer = await asyncio.open_connection(host, port,
                                                                         limit=CHUNK * 4)
        except OSError:
            client_writer.transport.abort()
            return
        for writer in (client_writer, server_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:  # the proxy must not hold small writes back (Nagle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._count(counts, connections=1)
        state = {"last": None}
        writers = (client_writer, server_writer)
        not_before = accepted + self.rtt if self.connect_rtt else 0.0
        pumps = [asyncio.ensure_future(self._pump(client_reader, server_writer, self.up, counts,
                                                  state, writers, not_before)),
                 asyncio.ensure_future(self._pump(server_reader, client_writer, self.down,
                                                  counts, state, writers, 0.0))]
        try:
            await asyncio.gather(*pumps)
        except asyncio.CancelledError:
            for pump in pumps:
                pump.cancel()
            for writer in writers:
                writer.transport.abort()
            raise
        for writer in writers:
            writer.close()

    async def _pump(self, reader, writer, direction, counts, state, writers, not_before):
        """Carry one direction of one connection: read, schedule on the wire, deliver when
        due. An error on either side aborts both (a reset crosses the link at once)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        held = {"bytes": 0}
        room = asyncio.Event()
        room.set()

        def cut():
            for each in writers:
                each.transport.abort()  # the readers see the end, both pumps stop
            room.set()

        async def deliver():
            try:
                while True:
                    due, data = await queue.get()
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if data is None:
                        if writer.can_write_eof() and not writer.transport.is_closing():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()
                    held["bytes"] -= len(data)
                    if held["bytes"] <= self.window:
                        room.set()
            except (ConnectionError, OSError):
                cut()

        delivering = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                sent = max(loop.time(), not_before)
                last_due = direction.schedule(len(data), sent)
                if direction.name == "up":
                    turn = 1 if state["last"] != "up" else 0
                    state["last"] = "up"
                    self._count(counts, up=len(data), turns=turn)
                else:
                    state["last"] = "down"
                    self._count(counts, down=len(data))
                queue.put_nowait((last_due, data))
                held["bytes"] += len(data)
                if held["bytes"] > self.window and not delivering.done():
                    room.clear()
                    await room.wait()
            # The end of the stream follows the last byte (or, with none, takes the one way).
            queue.put_nowait((max(last_due, loop.time() + direction.one_way), None))
            await delivering
        except (ConnectionError, OSError):
            cut()
        finally:
            delivering.cancel()


# --- Command line ---------------------------------------------------------------------------

def target(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="wanlink.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, required=True, metavar="MS",
                        help="round-trip time in milliseconds")
    parser.add_argument("--mbit", type=float, default=None,
                        help="bandwidth cap each way in Mbit/s (default: none)")
    parser.add_argument("--to", type=target, action="append", required=True,
                        metavar="HOST:PORT", help="a target; one proxy each, all on one link")
    args = parser.parse_args(argv)
    with Link(args.rtt, args.mbit) as link:
        for host, port in args.to:
            print(f"127.0.0.1:{link.proxy(host, port)} -> {host}:{port} across {link}",
                  flush=True)
        try:
            while True:
                time.sleep(5)
                counts = link.snapshot()
                print(f"up {counts['up']} B, down {counts['down']} B, "
                      f"{counts['connections']} connections, {counts['turns']} turns",
                      file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
