"""Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` on ``grpc.aio``
(messages, limits and status codes: docs/architecture.md, "service").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.errors import NotReady, Unauthorized, client_error
from service.metrics import model_label
from service.oip import (
    CONTENTS_FIELD,
    InferRequest,
    InferResponse,
    InferTensor,
    OipError,
    RequestedOutput,
    decode_raw,
    decode_typed_values,
    encode_raw,
)
from service.oip_http import model_ready_unlisted, presented_api_key
from service.oip_models import ModelRegistry, default_registry, server_metadata
from service.protocols import FrontEndRuntime

__all__ = [
    "PROTOCOL",
    "GrpcServerHandle",
    "GrpcServicer",
    "infer_request_from_proto",
    "infer_response_to_proto",
    "start_grpc_server",
]

logger = logging.getLogger(__name__)

PROTOCOL = "grpc"

_STATUS_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_CONTENTS_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))
# Raw tensors up to this size are decoded and encoded on the event loop (microseconds for a 256 x 256 image,
# where a worker-thread hop each way cost a loop wake-up and a scheduler wait); larger ones and typed contents
# (converted value by value) still go to a thread.
_INLINE_CODEC_BYTES = 1 << 20


def _raw_bytes(message: service_pb2.ModelInferRequest) -> int:
    """Bytes of raw tensor data in ``message``; typed contents (decoded value by value) count as unbounded."""
    raw = message.raw_input_contents
    if len(raw) != len(message.inputs):
        return 1 << 62
    return sum(len(data) for data in raw)


class _RpcError(Exception):
    """A failure already mapped to a status code (and its HTTP equivalent, for metrics)."""

    def __init__(self, http_status: int, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = _STATUS_BY_HTTP.get(http_status, grpc.StatusCode.INTERNAL)
        self.message = message
        self.trailing = trailing


def _as_rpc_error(exc: Exception) -> _RpcError:
    """``exc`` as a gRPC status, mapped by type (``service.errors.client_error``); Retry-After as trailing metadata."""
    error = client_error(exc, generic=f"internal server error ({type(exc).__name__})")
    trailing = tuple((key.lower(), value) for key, value in error.headers().items() if key.lower() == "retry-after")
    return _RpcError(error.code, error.message, trailing)


# ----------------------------------------------------------------------------------------------------------
# Protobuf <-> transport-independent requests
# ----------------------------------------------------------------------------------------------------------


def _parameter_value(parameter: service_pb2.InferParameter) -> object:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _parameters(parameters: Mapping[str, service_pb2.InferParameter]) -> dict[str, object]:
    return {key: _parameter_value(value) for key, value in parameters.items()}


def _decode_input(tensor: Any, raw: bytes | None) -> InferTensor:
    name = tensor.name
    if not name:
        raise OipError("every input needs a non-empty name", field="inputs")
    parameters = _parameters(tensor.parameters)
    if "shared_memory_region" in parameters:
        raise OipError(f"input '{name}': shared memory is not supported by this server", field=name)
    filled = [f for f in _CONTENTS_FIELDS if len(getattr(tensor.contents, f))]
    if raw is not None:
        if filled:
            raise OipError(
                f"input '{name}' has typed contents ({', '.join(filled)}) and raw_input_contents; use one",
                field=name,
            )
        data = decode_raw(name, tensor.datatype, tensor.shape, raw)
    else:
        expected = CONTENTS_FIELD.get(tensor.datatype)
        stray = [f for f in filled if f != expected]
        if stray:
            where = f"its data goes in contents.{expected}" if expected else "it must be sent in raw_input_contents"
            raise OipError(
                f"input '{name}' ({tensor.datatype}) carries contents.{stray[0]}; {where}", field=name
            )
        values = getattr(tensor.contents, expected) if expected else ()
        data = decode_typed_values(name, tensor.datatype, tensor.shape, values)
    return InferTensor(name=name, datatype=tensor.datatype, data=data, parameters=parameters)


def infer_request_from_proto(message: service_pb2.ModelInferRequest) -> InferRequest:
    """A ``ModelInferRequest`` -> ``InferRequest`` with every input decoded and validated.

    Raises:
        OipError: a raw_input_contents count other than the input count, typed and raw data mixed, data
            in a field that does not match the datatype, or any codec validation failure.
    """
    raw_contents = message.raw_input_contents
    if raw_contents and len(raw_contents) != len(message.inputs):
        raise OipError(
            f"raw_input_contents has {len(raw_contents)} entries but the request has {len(message.inputs)} inputs; "
            "send one per input, in input order",
            field="raw_input_contents",
        )
    inputs = tuple(
        _decode_input(tensor, raw_contents[index] if raw_contents else None)
        for index, tensor in enumerate(message.inputs)
    )
    outputs = tuple(
        RequestedOutput(name=output.name, parameters=_parameters(output.parameters)) for output in message.outputs
    )
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        parameters=_parameters(message.parameters),
    )


def infer_response_to_proto(response: InferResponse) -> service_pb2.ModelInferResponse:
    """``InferResponse`` -> ``ModelInferResponse`` with every output in ``raw_output_contents``."""
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        output = message.outputs.add()
        output.name = tensor.name
        output.datatype = tensor.datatype
        output.shape.extend(tensor.shape)
        message.raw_output_contents.append(encode_raw(tensor.data, tensor.datatype))
    for key, value in response.parameters.items():
        if isinstance(value, str):
            message.parameters[key].string_param = value
    return message


# ----------------------------------------------------------------------------------------------------------
# The servicer
# ----------------------------------------------------------------------------------------------------------

Rpc = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class GrpcServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 RPCs over a ``ServiceRuntime`` and a ``ModelRegistry``."""

    def __init__(self, runtime: FrontEndRuntime, registry: ModelRegistry | None = None) -> None:
        self.runtime = runtime
        self.registry = registry or default_registry()

    async def _call(
        self, rpc_name: str, request: Any, context: grpc.aio.ServicerContext, handler: Rpc, *, auth: bool = True,
        inference: bool = False,
    ) -> Any:
        """Run ``handler`` with the API-key check, status mapping and request metrics.

        ``inference=True``: refused with UNAVAILABLE once the server drains for shutdown (RPCs that started
        before the drain run to completion).

        The request is counted before the answer leaves, so a client never sees a reply its metric lacks.
        """
        start = time.perf_counter()
        # ModelInfer names its model in model_name, ModelReady/ModelMetadata in name; server RPCs in neither.
        model = model_label(getattr(request, "model_name", "") or getattr(request, "name", ""), self.registry.names)
        try:
            if inference and self.runtime.draining:
                raise NotReady("server shutting down; retry on another instance", retry_after=1)
            if auth:
                metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
                presented = presented_api_key(metadata.get("authorization"), metadata.get("x-api-key"))
                if not self.runtime.check_api_key(presented):
                    raise Unauthorized()
            response = await handler(request, context)
        except asyncio.CancelledError:
            self._observe(rpc_name, 499, start, model)  # the client went away or its deadline passed
            raise
        except Exception as exc:
            error = _as_rpc_error(exc)
            self._observe(rpc_name, error.http_status, start, model)
            if error.trailing:
                context.set_trailing_metadata(error.trailing)
            await context.abort(error.code, error.message)
        self._observe(rpc_name, 200, start, model)
        return response

    def _observe(self, rpc_name: str, http_status: int, start: float, model: str) -> None:
        self.runtime.metrics.observe_request(rpc_name, PROTOCOL, str(http_status), time.perf_counter() - start,
                                             model=model)

    # -- health -----------------------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        async def handle(request, context):
            return service_pb2.ServerLiveResponse(live=bool(self.runtime.live))

        return await self._call("ServerLive", request, context, handle, auth=False)

    async def ServerReady(self, request, context):
        async def handle(request, context):
            return service_pb2.ServerReadyResponse(ready=bool(self.runtime.ready))

        return await self._call("ServerReady", request, context, handle, auth=False)

    async def ModelReady(self, request, context):
        async def handle(request, context):
            ready = model_ready_unlisted(self.registry, self.runtime, request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=ready)

        return await self._call("ModelReady", request, context, handle, auth=False)

    # -- metadata ---------------------------------------------------------------------------------------

    async def ServerMetadata(self, request, context):
        async def handle(request, context):
            return service_pb2.ServerMetadataResponse(**server_metadata())

        return await self._call("ServerMetadata", request, context, handle)

    async def ModelMetadata(self, request, context):
        async def handle(request, context):
            meta = self.registry.model_metadata(self.runtime, request.name, request.version)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**spec) for spec in meta["inputs"]],
                outputs=[tensor(**spec) for spec in meta["outputs"]],
            )

        return await self._call("ModelMetadata", request, context, handle)

    # -- inference --------------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        async def handle(request, context):
            self.registry.get(self.runtime, request.model_name, request.model_version)  # NOT_FOUND before decoding
            # Small raw tensors are decoded and encoded on the loop: a thread hop costs more than the copy.
            if _raw_bytes(request) <= _INLINE_CODEC_BYTES:
                infer_request = infer_request_from_proto(request)
            else:
                infer_request = await asyncio.to_thread(infer_request_from_proto, request)
            infer_response = await self.registry.infer(self.runtime, infer_request, protocol=PROTOCOL)
            if sum(np.asarray(t.data).nbytes for t in infer_response.outputs) <= _INLINE_CODEC_BYTES:
                return infer_response_to_proto(infer_response)
            return await asyncio.to_thread(infer_response_to_proto, infer_response)

        return await self._call("ModelInfer", request, context, handle, inference=True)


def _unimplemented(rpc_name: str) -> Callable[..., Awaitable[Any]]:
    """An RPC answering UNIMPLEMENTED in plain words (the generated base class raises NotImplementedError,
    which grpc.aio turns into "Unexpected <class 'NotImplementedError'>" plus a logged traceback)."""

    async def rpc(self: GrpcServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc_name} is not implemented by this server")

    rpc.__name__ = rpc.__qualname__ = rpc_name
    return rpc


for _name in [n for n in vars(service_pb2_grpc.GRPCInferenceServiceServicer) if not n.startswith("_")]:
    if _name not in vars(GrpcServicer):
        setattr(GrpcServicer, _name, _unimplemented(_name))


# ----------------------------------------------------------------------------------------------------------
# Server lifecycle
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GrpcServerHandle:
    """A started gRPC server: ``port`` is the bound port (useful when 0 asked for a free one)."""

    server: grpc.aio.Server
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{_host_for_address(self.host)}:{self.port}"

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting RPCs; in-flight ones get ``grace_s`` seconds to finish (None: wait for all)."""
        await self.server.stop(grace_s)

    async def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout_s)


def _host_for_address(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def start_grpc_server(
    runtime: FrontEndRuntime,
    host: str = "127.0.0.1",
    port: int = 8001,
    *,
    registry: ModelRegistry | None = None,
    reuse_port: bool = False,
) -> GrpcServerHandle:
    """Start the KServe v2 gRPC server on the running event loop.

    Args:
        runtime: the ``service.runtime.ServiceRuntime`` (its ``settings.max_upload_bytes`` caps the size
            of a received message).
        host, port: bind address; ``port=0`` picks a free port (read it from the handle).
        registry: the models to serve (default: ``default_registry()``).
        reuse_port: set SO_REUSEPORT so several worker processes can share ``port`` (the kernel spreads
            connections); off by default so a port already in use is an error.

    Raises:
        OSError: if the address cannot be bound.
    """
    max_bytes = int(runtime.settings.max_upload_bytes)
    server = grpc.aio.server(
        # RPCs beyond max_concurrency are refused at once with RESOURCE_EXHAUSTED (HTTP answers 429)
        maximum_concurrent_rpcs=int(runtime.settings.max_concurrency),
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcServicer(runtime, registry), server)
    address = f"{_host_for_address(host)}:{int(port)}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"gRPC server could not bind {address} ({exc}); is the port in use?") from exc
    if bound == 0:
        raise OSError(f"gRPC server could not bind {address}; is the port in use?")
    await server.start()
    logger.info("KServe v2 gRPC server listening on %s", f"{_host_for_address(host)}:{bound}")
    return GrpcServerHandle(server=server, host=host, port=bound)
