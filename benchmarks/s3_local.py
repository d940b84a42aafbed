"""A local S3 endpoint with object-store latency, for the object-storage benchmarks (loader.py, build.py).

moto's server (`python -m moto.server`) answers the real S3 API on 127.0.0.1; in front of it a small TCP proxy
holds back the first bytes of every request by a fixed latency (default 20 ms), as a round trip to an object
store takes that long before its first byte. Every request pays it: a GET, a HEAD, a listing, a PUT (twice when
the client waits for `100 Continue`). Nothing here leaves 127.0.0.1.

    with local_s3(latency_ms=20) as (direct, delayed):   # endpoint URLs
        ...                                              # e.g. upload through `direct`, time reads through `delayed`
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

BUFFER = 4 << 20  # bytes per read: the proxy must not be what limits throughput
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quick_ack(sock) -> None:
    """Acknowledge what arrives at once: a Python HTTP server writes headers and body apart, and with Nagle on its
    side and delayed ACKs on ours every small response would wait 40 ms (a stall real object stores do not have)."""
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_data, sock=None) -> None:
    """Copy one direction of a connection, awaiting `on_data()` before forwarding each chunk."""
    try:
        while True:
            _quick_ack(sock)
            data = await reader.read(BUFFER)
            if not data:
                break
            await on_data()
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _proxy(listen: int, upstream: int, latency_s: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream, limit=BUFFER)
        new_request = True  # the client's next bytes start a request (nothing since the last response began)

        async def request() -> None:
            nonlocal new_request
            if new_request:  # the first bytes of a request: hold them back
                new_request = False
                await asyncio.sleep(latency_s)

        async def response() -> None:
            nonlocal new_request
            new_request = True

        upstream_socket = server_w.get_extra_info("socket")
        await asyncio.gather(
            _pump(client_r, server_w, request, client_w.get_extra_info("socket")),
            _pump(server_r, client_w, response, upstream_socket),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen, limit=BUFFER)
    async with server:
        await server.serve_forever()


def _wait_until_up(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 (loopback only)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start on {url}") from None
            time.sleep(0.1)


@contextmanager
def local_s3(latency_ms: float = 20.0) -> Iterator[tuple[str, str]]:
    """Start moto's server and the latency proxy; yield (direct endpoint, delayed endpoint); stop both.

    Also sets the S3 credentials environment (any values do for moto) for this process and its children.
    """
    os.environ.update(CREDENTIALS)
    moto_port, proxy_port = free_port(), free_port()
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)], **quiet)]
    try:
        direct, delayed = f"http://127.0.0.1:{moto_port}", f"http://127.0.0.1:{proxy_port}"
        _wait_until_up(f"{direct}/moto-api/", procs[0], "moto server")
        proxy = [sys.executable, __file__, str(proxy_port), str(moto_port), str(latency_ms)]
        procs.append(subprocess.Popen(proxy, **quiet))
        _wait_until_up(f"{delayed}/moto-api/", procs[1], "latency proxy")
        yield direct, delayed
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":  # the proxy process: LISTEN_PORT UPSTREAM_PORT LATENCY_MS
    asyncio.run(_proxy(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000))
