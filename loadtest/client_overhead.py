"""What the HTTP load generator itself costs per request, by client library and requests in flight."""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.system import free_port, machine_description
from loadtest.workload import Workload

__all__ = ["STAND_IN_SERVER", "measure_client", "run"]

CLIENTS = ("httpx", "aiohttp")

STAND_IN_SERVER = r'''
import asyncio, sys

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            await asyncio.sleep(float(sys.argv[2]))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=2048)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


async def _httpx_requests(url: str, workload: Workload, inflight: int, count: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        gate = asyncio.Semaphore(inflight)

        async def one(index: int) -> None:
            async with gate:
                files = {"file": (f"image{index}.png", workload.png(index), "image/png")}
                response = await client.post("/segment", files=files)
                if response.status_code != 200:
                    raise RuntimeError(f"stand-in server answered {response.status_code}")

        await asyncio.gather(*(one(i) for i in range(count)))


async def _aiohttp_requests(url: str, workload: Workload, inflight: int, count: int) -> None:
    from loadtest.http_load import http_client, http_sender

    async with http_client(url, connections=inflight, timeout_s=120) as client:
        send = http_sender(client, "rest", workload)
        gate = asyncio.Semaphore(inflight)

        async def one(index: int) -> None:
            async with gate:
                await send(index)

        await asyncio.gather(*(one(i) for i in range(count)))


def measure_client(library: str, url: str, *, inflight: int, count: int, image_size: int = 96) -> dict[str, Any]:
    """CPU milliseconds per request and achieved requests/s of ``library`` with ``inflight`` in flight."""
    if library not in CLIENTS:
        raise ValueError(f"client library must be one of {CLIENTS}, got {library!r}")
    workload = Workload(size=image_size)
    for index in range(workload.pool_size):
        workload.png(index)  # encode the pool up front: only the client's own work is timed
    requests = _httpx_requests if library == "httpx" else _aiohttp_requests
    cpu0, wall0 = time.process_time(), time.perf_counter()
    asyncio.run(requests(url, workload, inflight, count))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"client": library, "inflight": inflight, "requests": count, "cpu_ms_per_request": 1000 * cpu / count,
            "throughput_rps": count / wall, "wall_s": wall}


def run(args: argparse.Namespace) -> int:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", STAND_IN_SERVER, str(port), str(args.delay_s)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            print("python -m loadtest client-overhead: the stand-in server did not start", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}"
        rows = [measure_client(library, url, inflight=inflight, count=args.requests)
                for inflight in args.inflight for library in CLIENTS]
    finally:
        server.terminate()
        server.wait(timeout=10)
    for row in rows:
        print(f"{row['client']:8s} in flight {row['inflight']:4d}: {row['cpu_ms_per_request']:.2f} ms CPU per "
              f"request, {row['throughput_rps']:.0f} req/s")
    if args.out:
        report = {"format": "medrefine-client-overhead/1",
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine_description(), "server_delay_s": args.delay_s, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=1000, help="requests per client and in-flight level")
    parser.add_argument("--inflight", type=lambda s: [int(v) for v in s.split(",")], default=[16, 256])
    parser.add_argument("--delay-s", type=float, default=0.2, help="the stand-in server's answer delay")
    parser.add_argument("--out", default=None, help="results JSON")
