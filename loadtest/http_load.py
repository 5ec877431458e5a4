"""HTTP load on one asyncio loop (aiohttp): REST ``POST /segment`` and OIP ``POST /v2/models/segment/infer``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loadtest.driver import LoadRun, LoadSpec, RequestFailed, run_load
from loadtest.workload import Workload

__all__ = [
    "CLIENT_KEEPALIVE_S",
    "HTTP_PROTOCOLS",
    "http_sender",
    "oip_infer_body",
    "require_loopback",
    "run_http_load",
]

HTTP_PROTOCOLS = ("rest", "oip-http")
SEGMENT_PATH = "/segment"
OIP_MODEL = "segment"
# An idle connection is dropped by the client before any server closes it (uvicorn's default keep-alive is
# 5 s, ours 75 s), so a request never races a server-side close on a reused socket.
CLIENT_KEEPALIVE_S = 4.0
SHED_STATUSES = (429, 503)


def require_loopback(url: str) -> str:
    """Return ``url`` when its host resolves to a loopback address, else raise ValueError naming it.

    Load tests must never reach another machine.
    """
    host = urlsplit(url if "://" in url else f"//{url}").hostname
    if not host:
        raise ValueError(f"load target {url!r} has no host")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"load target {url!r}: cannot resolve {host!r} ({exc})") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"load target {url!r} is not a loopback address ({sorted(addresses)}); load tests stay local")
    return url


def oip_infer_body(image) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an OIP binary-data infer request for ``image`` ((H, W) uint8)."""
    height, width = image.shape
    header = json.dumps({
        "inputs": [{"name": "IMAGE", "shape": [height, width], "datatype": "UINT8",
                    "parameters": {"binary_data_size": height * width}}],
        "outputs": [{"name": "MASK", "parameters": {"binary_data": True}}],
    }).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + image.tobytes(), headers


def http_sender(
    client: aiohttp.ClientSession, protocol: str, workload: Workload, *, api_key: str | None = None
) -> Callable[[int], Awaitable[None]]:
    """``send(i)`` for ``protocol`` (``"rest"`` or ``"oip-http"``); raises :class:`RequestFailed` on non-200.

    A 429 or 503 that carries ``Retry-After`` is load shedding (``RequestFailed.shed``), not a fault.
    """
    if protocol not in HTTP_PROTOCOLS:
        raise ValueError(f"HTTP protocol must be one of {HTTP_PROTOCOLS}, got {protocol!r}")
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    oip_bodies: dict[int, tuple[bytes, dict[str, str]]] = {}

    async def check(response: aiohttp.ClientResponse) -> None:
        body = await response.read()
        if response.status != 200:
            shed = response.status in SHED_STATUSES and "Retry-After" in response.headers
            raise RequestFailed(f"http-{response.status}", body[:200].decode("utf-8", "replace"), shed=shed)

    async def send_rest(index: int) -> None:
        form = aiohttp.FormData()
        form.add_field("file", workload.png(index), filename=f"image{index % workload.pool_size}.png",
                       content_type="image/png")
        async with client.post(SEGMENT_PATH, data=form, headers=auth) as response:
            await check(response)

    async def send_oip(index: int) -> None:
        key = index % workload.pool_size
        if key not in oip_bodies:
            oip_bodies[key] = oip_infer_body(workload.image(index))
        body, headers = oip_bodies[key]
        async with client.post(f"/v2/models/{OIP_MODEL}/infer", data=body, headers={**headers, **auth}) as response:
            await check(response)

    return send_rest if protocol == "rest" else send_oip


@asynccontextmanager
async def http_client(url: str, *, connections: int, timeout_s: float):
    """An aiohttp session for a loopback ``url`` with up to ``connections`` keep-alive connections."""
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(base_url=require_loopback(url), connector=connector, timeout=timeout) as client:
        yield client


async def run_http_load(
    url: str, protocol: str, spec: LoadSpec, workload: Workload, *, timeout_s: float = 60.0,
    api_key: str | None = None,
) -> LoadRun:
    """One load step over HTTP; returns the records (see ``LoadRun.summary``)."""
    connections = spec.concurrency if spec.mode == "closed" else spec.max_inflight
    async with http_client(url, connections=connections, timeout_s=timeout_s) as client:
        return await run_load(http_sender(client, protocol, workload, api_key=api_key), spec)


def run_http_load_sync(url: str, protocol: str, spec: LoadSpec, workload: Workload, **kwargs: Any) -> LoadRun:
    """:func:`run_http_load` on a fresh event loop."""
    return asyncio.run(run_http_load(url, protocol, spec, workload, **kwargs))
