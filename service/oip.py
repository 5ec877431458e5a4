"""Open Inference Protocol (KServe v2, as Triton speaks it): a framework-free tensor codec.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.errors import InputError

__all__ = [
    "BINARY_DATA_EXTENSION",
    "CONTENTS_FIELD",
    "DATATYPES",
    "InferRequest",
    "InferResponse",
    "InferTensor",
    "ModelNotFoundError",
    "OipError",
    "RequestedOutput",
    "decode_json_data",
    "decode_raw",
    "decode_typed_values",
    "deserialize_bytes",
    "element_count",
    "encode_http_infer_response",
    "encode_json_data",
    "encode_raw",
    "parse_http_infer_request",
    "serialize_bytes",
    "validate_shape",
]

BINARY_DATA_EXTENSION = "binary_tensor_data"

# Native numpy dtype of each datatype once decoded; BYTES elements are python ``bytes`` in an object array.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# Little-endian layout on the wire (BOOL travels as one byte 0/1).
_WIRE: dict[str, np.dtype] = {
    name: (np.dtype(np.uint8) if name == "BOOL" else dtype.newbyteorder("<"))
    for name, dtype in DATATYPES.items()
    if name != "BYTES"
}

# gRPC InferTensorContents field per datatype (FP16 has none: it must travel raw).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_LENGTH_PREFIX = struct.Struct("<I")


class OipError(InputError):
    """An invalid inference request or tensor: HTTP 400, gRPC INVALID_ARGUMENT.

    Args:
        message: what is wrong, naming the tensor/field and what was expected.
        field: the request field at fault (an input name, ``"parameters.threshold"``, ...), or None.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field)


class ModelNotFoundError(OipError):
    """The request names a model or model version this server does not serve: HTTP 404, gRPC NOT_FOUND."""


@dataclass(frozen=True)
class InferTensor:
    """A named tensor: a request input or a response output.

    ``data`` has the tensor's full shape and the native dtype of ``datatype`` (``DATATYPES``);
    BYTES tensors are object arrays of python ``bytes``.
    """

    name: str
    datatype: str
    data: np.ndarray
    parameters: Mapping[str, object] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True)
class RequestedOutput:
    """An output named in the request; ``binary_data`` None means "as the request-level default"."""

    name: str
    binary_data: bool | None = None
    parameters: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request, transport-independent.

    ``outputs`` empty means "every output of the model"; ``parameters`` are the request-level
    parameters (``binary_data_output``, model options such as ``threshold``, ...).
    """

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: tuple[InferTensor, ...] = ()
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: Mapping[str, object] = field(default_factory=dict)

    @property
    def binary_data_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True

    def wants_binary(self, output_name: str) -> bool:
        """Whether ``output_name`` goes back as binary data (its own ``binary_data`` wins over the default)."""
        for requested in self.outputs:
            if requested.name == output_name and requested.binary_data is not None:
                return requested.binary_data
        return self.binary_data_output


@dataclass(frozen=True)
class InferResponse:
    """A transport-independent inference response (outputs in the order they are sent)."""

    model_name: str
    model_version: str = ""
    id: str = ""
    outputs: tuple[InferTensor, ...] = ()
    parameters: Mapping[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Shapes and datatypes
# ----------------------------------------------------------------------------------------------------------


def _check_datatype(datatype: object, *, name: str) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise OipError(
            f"tensor '{name}' has unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}",
            field=name,
        )
    return datatype


# Past this numpy cannot describe an array of the shape at all, even an empty one ("array is too big",
# "Maximum allowed dimension exceeded"): refuse such shapes with our own message naming the tensor.
_MAX_DIM_PRODUCT = 2**56


def validate_shape(shape: object, *, name: str) -> tuple[int, ...]:
    """The shape as a tuple of non-negative ints.

    Raises:
        OipError: if ``shape`` is not a sequence of non-negative integers, or its non-zero dimensions
            multiply to more than ``2**56``.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise OipError(f"tensor '{name}' shape must be a list of integers, got {shape!r}", field=name)
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 0:
            raise OipError(
                f"tensor '{name}' shape {list(shape)!r} must hold non-negative integers, got {dim!r}", field=name
            )
        dims.append(int(dim))
    if math.prod(d for d in dims if d) > _MAX_DIM_PRODUCT:
        raise OipError(f"tensor '{name}' shape {dims} is too large: its non-zero dimensions multiply to more than "
                       "2**56", field=name)
    return tuple(dims)


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of ``shape`` (1 for a scalar shape ``[]``)."""
    return math.prod(int(d) for d in shape)


def _count_mismatch(name: str, got: int, shape: tuple[int, ...]) -> OipError:
    return OipError(
        f"tensor '{name}' has {got} elements but shape {list(shape)} needs {element_count(shape)}", field=name
    )


def _check_finite(array: np.ndarray, *, name: str, datatype: str) -> None:
    if datatype in _FLOAT_TYPES and array.size and not np.isfinite(array).all():
        index = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        value = array.reshape(-1)[index]
        raise OipError(
            f"tensor '{name}' ({datatype}) holds a non-finite value ({value}) at flat index {index}; "
            "NaN and infinity are not accepted",
            field=name,
        )


def _check_integer_range(array: np.ndarray, *, name: str, datatype: str) -> None:
    target = DATATYPES[datatype]
    if target.kind not in "iu" or array.size == 0:
        return
    info = np.iinfo(target)
    low, high = array.min(), array.max()
    if int(low) < info.min or int(high) > info.max:
        raise OipError(
            f"tensor '{name}' values span [{int(low)}, {int(high)}], outside the {datatype} range "
            f"[{info.min}, {info.max}]",
            field=name,
        )


# ----------------------------------------------------------------------------------------------------------
# BYTES elements
# ----------------------------------------------------------------------------------------------------------


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> wire bytes: each element (row-major) as a 4-byte little-endian length + its bytes.

    Elements may be ``bytes`` or ``str`` (encoded as UTF-8).
    """
    parts = []
    for element in np.asarray(array, dtype=object).reshape(-1):
        value = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(_LENGTH_PREFIX.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, *, name: str, count: int | None = None) -> np.ndarray:
    """Wire bytes of a BYTES tensor -> 1-D object array of ``bytes``.

    Args:
        raw: length-prefixed elements back to back.
        name: the tensor name, for error messages.
        count: the element count the shape requires, or None to accept any.

    Raises:
        OipError: on a truncated length prefix or element, or a count other than ``count``.
    """
    view = memoryview(raw).cast("B")
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise OipError(
                f"BYTES tensor '{name}': truncated 4-byte length prefix at byte {offset} of {len(view)}", field=name
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise OipError(
                f"BYTES tensor '{name}': element {len(elements)} declares {length} bytes but only "
                f"{len(view) - offset} remain",
                field=name,
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if count is not None and len(elements) != count:
        raise OipError(
            f"BYTES tensor '{name}' holds {len(elements)} length-prefixed elements but its shape needs {count}",
            field=name,
        )
    out = np.empty(len(elements), dtype=object)
    out[:] = elements
    return out


def _bytes_array(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Decoders: wire -> numpy
# ----------------------------------------------------------------------------------------------------------


def _flatten_json(data: list, *, name: str, accept: type | tuple[type, ...], what: str) -> list:
    """Leaves of a (nested) JSON array in row-major order; each must be an ``accept`` (never a bool
    unless ``accept`` is bool)."""
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, accept) or (isinstance(item, bool) and accept is not bool):
                raise OipError(
                    f"tensor '{name}' data must hold {what}, got {type(item).__name__} {item!r}", field=name
                )
            flat.append(item)
        else:
            stack.pop()
    return flat


def decode_json_data(name: str, datatype: str, shape: Sequence[int], data: object) -> np.ndarray:
    """JSON ``data`` (flat or nested array, row-major) -> array of ``shape`` and ``DATATYPES[datatype]``.

    Raises:
        OipError: if ``data`` is not an array of the JSON kind ``datatype`` needs (booleans for BOOL,
            strings for BYTES, integers for integer types, numbers for FP types), is ragged, has an
            element count other than the shape's, values outside an integer type's range, or NaN/inf.
    """
    datatype = _check_datatype(datatype, name=name)
    shape = validate_shape(shape, name=name)
    if not isinstance(data, list):
        raise OipError(f"tensor '{name}' data must be a JSON array, got {type(data).__name__}", field=name)
    if datatype == "BYTES":
        flat = [s.encode("utf-8") for s in _flatten_json(data, name=name, accept=str, what="JSON strings")]
        if len(flat) != element_count(shape):
            raise _count_mismatch(name, len(flat), shape)
        return _bytes_array(flat, shape)
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):  # numpy's own text names no tensor and speaks of its internals
        raise OipError(f"tensor '{name}' data is not a regular array of numbers: nested arrays must all have "
                       f"the same length (shape {list(shape)}, row-major, or one flat array)", field=name) from None
    if array.size != element_count(shape):
        raise _count_mismatch(name, int(array.size), shape)
    if array.size == 0:
        return np.zeros(shape, dtype=DATATYPES[datatype])
    kind = array.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise OipError(f"BOOL tensor '{name}' data must hold true/false, got {array.dtype} values", field=name)
    elif datatype in _FLOAT_TYPES:
        if kind not in "iuf":
            raise OipError(f"{datatype} tensor '{name}' data must hold numbers, got {_json_kind(array)}", field=name)
    elif kind in "fO":
        # Floats, or ints numpy could not type exactly (int64 and uint64 values mixed promote to float64):
        # check every leaf is an integer and range-check them as python ints.
        leaves = _flatten_json(data, name=name, accept=int, what="integers")
        array = np.array(leaves, dtype=object)
    elif kind not in "iu":
        raise OipError(f"{datatype} tensor '{name}' data must hold integers, got {_json_kind(array)}", field=name)
    _check_integer_range(array, name=name, datatype=datatype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.reshape(shape).astype(DATATYPES[datatype])
    _check_finite(out, name=name, datatype=datatype)  # after the cast: also catches overflow to inf
    return out


def _json_kind(array: np.ndarray) -> str:
    return {"b": "booleans", "f": "non-integer numbers", "U": "strings", "O": "mixed or out-of-range values"}.get(
        array.dtype.kind, str(array.dtype)
    )


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Raw little-endian row-major bytes -> array of ``shape`` and ``DATATYPES[datatype]`` (a copy).

    Raises:
        OipError: if the byte count is not ``element_count(shape) x`` the datatype size (BYTES: if the
            length-prefixed elements are truncated or their count differs), a BOOL byte is not 0/1, or
            a float is NaN/inf.
    """
    datatype = _check_datatype(datatype, name=name)
    shape = validate_shape(shape, name=name)
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, name=name, count=count).reshape(shape)
    wire = _WIRE[datatype]
    expected = count * wire.itemsize
    if len(raw) != expected:
        raise OipError(
            f"tensor '{name}' has {len(raw)} bytes of data but shape {list(shape)} of {datatype} needs "
            f"{expected} ({count} elements x {wire.itemsize} bytes)",
            field=name,
        )
    array = np.frombuffer(raw, dtype=wire)
    if datatype == "BOOL" and array.size and array.max() > 1:
        raise OipError(f"BOOL tensor '{name}' holds a byte other than 0 or 1", field=name)
    out = array.astype(DATATYPES[datatype]).reshape(shape)
    _check_finite(out, name=name, datatype=datatype)
    return out


_CONTENTS_DTYPE = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def decode_typed_values(name: str, datatype: str, shape: Sequence[int], values: Sequence) -> np.ndarray:
    """Typed values (the gRPC ``InferTensorContents`` field ``CONTENTS_FIELD[datatype]``) -> array.

    Raises:
        OipError: for FP16 (which has no typed field and must travel raw), an element count other than
            the shape's, values outside a narrower integer type's range, or NaN/inf.
    """
    datatype = _check_datatype(datatype, name=name)
    shape = validate_shape(shape, name=name)
    if datatype not in CONTENTS_FIELD:
        raise OipError(
            f"{datatype} tensor '{name}' has no typed contents field; send it as raw bytes", field=name
        )
    if len(values) != element_count(shape):
        raise _count_mismatch(name, len(values), shape)
    if datatype == "BYTES":
        return _bytes_array([bytes(v) for v in values], shape)
    array = np.array(values, dtype=_CONTENTS_DTYPE[CONTENTS_FIELD[datatype]])
    _check_integer_range(array, name=name, datatype=datatype)
    out = array.astype(DATATYPES[datatype]).reshape(shape)
    _check_finite(out, name=name, datatype=datatype)
    return out


# ----------------------------------------------------------------------------------------------------------
# Encoders: numpy -> wire
# ----------------------------------------------------------------------------------------------------------


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    """Array -> raw little-endian row-major bytes of ``datatype`` (BYTES: length-prefixed elements)."""
    datatype = _check_datatype(datatype, name="<output>")
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=_WIRE[datatype]).tobytes()


def encode_json_data(array: np.ndarray, datatype: str, *, name: str = "<output>") -> list:
    """Array -> flat row-major JSON list of ``datatype`` (BYTES elements as UTF-8 strings).

    Raises:
        OipError: if a BYTES element is not valid UTF-8 (it can only travel as binary data).
    """
    datatype = _check_datatype(datatype, name=name)
    flat = np.asarray(array).reshape(-1)
    if datatype == "BYTES":
        try:
            return [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in flat]
        except UnicodeDecodeError as exc:
            raise OipError(
                f"BYTES output '{name}' is not UTF-8 and cannot be sent as JSON; request it as binary data",
                field=name,
            ) from exc
    return flat.astype(DATATYPES[datatype], copy=False).tolist()


# ----------------------------------------------------------------------------------------------------------
# HTTP/REST request and response bodies
# ----------------------------------------------------------------------------------------------------------


def _parameters(value: object, *, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OipError(f"{where} parameters must be a JSON object, got {type(value).__name__}", field=where)
    return value


def _binary_data_size(parameters: Mapping[str, object], *, name: str) -> int | None:
    for key in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if key in parameters:
            raise OipError(f"input '{name}': shared memory ('{key}') is not supported by this server", field=name)
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise OipError(
            f"input '{name}' parameters.binary_data_size must be a non-negative integer, got {size!r}", field=name
        )
    return size


def _parse_header_length(header_length: int | str | None, body_length: int) -> int | None:
    if header_length is None:
        return None
    try:
        length = int(header_length)
    except (TypeError, ValueError) as exc:
        raise OipError(
            f"Inference-Header-Content-Length must be an integer, got {header_length!r}",
            field="Inference-Header-Content-Length",
        ) from exc
    if not 0 < length <= body_length:
        raise OipError(
            f"Inference-Header-Content-Length {length} must be in [1, {body_length}] (the body length)",
            field="Inference-Header-Content-Length",
        )
    return length


def _load_json(header: bytes | memoryview) -> object:
    try:
        return json.loads(bytes(header))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OipError(f"inference request header is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise OipError("inference request header nests JSON arrays/objects too deeply") from exc


def parse_http_infer_request(
    body: bytes,
    *,
    model_name: str,
    model_version: str = "",
    header_length: int | str | None = None,
) -> InferRequest:
    """An HTTP/REST inference request body -> ``InferRequest`` with every input decoded.

    Args:
        body: the whole (decompressed) request body.
        model_name, model_version: from the URL.
        header_length: the ``Inference-Header-Content-Length`` header: the JSON object is
            ``body[:header_length]`` and the binary tensor data of the inputs whose parameters carry
            ``binary_data_size`` follows it in input order. None: the whole body is JSON.

    Raises:
        OipError: naming the field or input at fault (malformed JSON or structure, unsupported datatype,
            bad shape, data/binary size mismatches, NaN/inf, unclaimed trailing bytes).
    """
    length = _parse_header_length(header_length, len(body))
    view = memoryview(body)
    document = _load_json(view[:length] if length is not None else view)
    if not isinstance(document, dict):
        raise OipError(f"inference request must be a JSON object, got {type(document).__name__}")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise OipError(f"request id must be a string, got {request_id!r}", field="id")
    parameters = _parameters(document.get("parameters"), where="request")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError("inference request needs a non-empty 'inputs' array", field="inputs")

    offset = length if length is not None else len(body)
    inputs: list[InferTensor] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw_inputs):
        if not isinstance(entry, dict):
            raise OipError(f"inputs[{index}] must be a JSON object", field="inputs")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise OipError(f"inputs[{index}] needs a non-empty string 'name'", field="inputs")
        if name in seen:
            raise OipError(f"input '{name}' is given more than once", field=name)
        seen.add(name)
        datatype = _check_datatype(entry.get("datatype"), name=name)
        shape = validate_shape(entry.get("shape"), name=name)
        input_parameters = _parameters(entry.get("parameters"), where=f"input '{name}'")
        size = _binary_data_size(input_parameters, name=name)
        if size is not None:
            if "data" in entry:
                raise OipError(f"input '{name}' has both 'data' and parameters.binary_data_size", field=name)
            if length is None:
                raise OipError(
                    f"input '{name}' sets binary_data_size but the request has no "
                    "Inference-Header-Content-Length header",
                    field=name,
                )
            if offset + size > len(body):
                raise OipError(
                    f"input '{name}' binary_data_size {size} runs past the end of the body "
                    f"({len(body) - offset} bytes of binary data left)",
                    field=name,
                )
            data = decode_raw(name, datatype, shape, view[offset : offset + size])
            offset += size
        elif "data" in entry:
            data = decode_json_data(name, datatype, shape, entry["data"])
        else:
            raise OipError(f"input '{name}' has neither 'data' nor parameters.binary_data_size", field=name)
        extra = {k: v for k, v in input_parameters.items() if k != "binary_data_size"}
        inputs.append(InferTensor(name=name, datatype=datatype, data=data, parameters=extra))
    if offset != len(body):
        raise OipError(
            f"{len(body) - offset} bytes after the JSON header are not claimed by any input's binary_data_size"
        )
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=tuple(inputs),
        outputs=_parse_requested_outputs(document.get("outputs")),
        parameters=parameters,
    )


def _parse_requested_outputs(raw_outputs: object) -> tuple[RequestedOutput, ...]:
    if raw_outputs is None:
        return ()
    if not isinstance(raw_outputs, list):
        raise OipError("'outputs' must be a JSON array", field="outputs")
    outputs = []
    for index, entry in enumerate(raw_outputs):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise OipError(f"outputs[{index}] must be an object with a string 'name'", field="outputs")
        name = entry["name"]
        parameters = _parameters(entry.get("parameters"), where=f"output '{name}'")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise OipError(f"output '{name}' parameters.binary_data must be true or false", field=name)
        if parameters.get("classification"):
            raise OipError(f"output '{name}': the classification extension is not supported", field=name)
        if "shared_memory_region" in parameters:
            raise OipError(f"output '{name}': shared memory is not supported by this server", field=name)
        outputs.append(RequestedOutput(name=name, binary_data=binary, parameters=parameters))
    return tuple(outputs)


def encode_http_infer_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """``InferResponse`` -> (HTTP body, JSON header length or None).

    Each output goes as binary data when the request asked for it (the output's ``binary_data``, else
    the request's ``binary_data_output``), otherwise as JSON ``data``. The header length is None when
    no output is binary (the body is plain JSON); otherwise the caller sends it as
    ``Inference-Header-Content-Length``.
    """
    outputs_json = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, object] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = dict(tensor.parameters)
        if request.wants_binary(tensor.name):
            blob = encode_raw(tensor.data, tensor.datatype)
            blobs.append(blob)
            parameters["binary_data_size"] = len(blob)
        else:
            entry["data"] = encode_json_data(tensor.data, tensor.datatype, name=tensor.name)
        if parameters:
            entry["parameters"] = parameters
        outputs_json.append(entry)
    document: dict[str, object] = {"model_name": response.model_name}
    if response.model_version:
        document["model_version"] = response.model_version
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = dict(response.parameters)
    document["outputs"] = outputs_json
    try:
        header = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError as exc:  # a NaN/inf output is a server fault, not a client error
        raise RuntimeError(f"inference response holds a non-finite value and cannot be sent as JSON: {exc}") from exc
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
