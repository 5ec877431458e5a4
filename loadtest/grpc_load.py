"""OIP gRPC load on one asyncio loop with the stock client, ``tritonclient.grpc.aio``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from loadtest.driver import LoadRun, LoadSpec, RequestFailed, run_load
from loadtest.http_load import OIP_MODEL, require_loopback
from loadtest.workload import Workload

__all__ = ["grpc_sender", "run_grpc_load"]

# The server's documented refusals under load (each with a retry-after trailer), not faults.
SHED_STATUSES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


def grpc_sender(client, workload: Workload, *, timeout_s: float = 60.0,
                api_key: str | None = None) -> Callable[[int], Awaitable[None]]:
    """``send(i)`` over a ``tritonclient.grpc.aio.InferenceServerClient``.

    Raises (from ``send``):
        RequestFailed: ``"grpc-<STATUS>"`` for an error status, ``"bad-output"`` for a wrong MASK shape.
    """
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    headers = {"authorization": f"Bearer {api_key}"} if api_key else None

    async def send(index: int) -> None:
        image = workload.image(index)
        tensor = grpcclient.InferInput("IMAGE", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        try:
            result = await client.infer(
                OIP_MODEL, [tensor], outputs=[grpcclient.InferRequestedOutput("MASK")],
                client_timeout=timeout_s, headers=headers,
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "UNKNOWN").replace("StatusCode.", "")
            raise RequestFailed(f"grpc-{status}", str(exc.message())[:200], shed=status in SHED_STATUSES) from None
        mask = result.as_numpy("MASK")
        if mask is None or mask.shape != image.shape:
            raise RequestFailed("bad-output", f"MASK shape {None if mask is None else mask.shape}")

    return send


async def run_grpc_load(url: str, spec: LoadSpec, workload: Workload, *, timeout_s: float = 60.0,
                        api_key: str | None = None) -> LoadRun:
    """One load step over gRPC against ``host:port`` (loopback only)."""
    import tritonclient.grpc.aio as grpcclient

    require_loopback(url)
    client = grpcclient.InferenceServerClient(url=url)
    try:
        return await run_load(grpc_sender(client, workload, timeout_s=timeout_s, api_key=api_key), spec)
    finally:
        await client.close()


def run_grpc_load_sync(url: str, spec: LoadSpec, workload: Workload, **kwargs) -> LoadRun:
    """:func:`run_grpc_load` on a fresh event loop."""
    return asyncio.run(run_grpc_load(url, spec, workload, **kwargs))
