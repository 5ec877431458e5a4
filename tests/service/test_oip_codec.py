"""service.oip: tensor codec round trips (JSON, raw/binary, typed values) and request validation.

The binary-extension bodies are built and read with the stock tritonclient.http encoder/decoder, so the
wire format is checked against the reference client, not only against itself.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from service.oip import (
    DATATYPES,
    InferRequest,
    InferResponse,
    InferTensor,
    OipError,
    RequestedOutput,
    decode_json_data,
    decode_raw,
    decode_typed_values,
    deserialize_bytes,
    encode_http_infer_response,
    encode_json_data,
    encode_raw,
    parse_http_infer_request,
    serialize_bytes,
)

SHAPE = (2, 3)


def _sample(datatype: str) -> np.ndarray:
    """A (2, 3) array of ``datatype`` with extreme and ordinary values."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        values = [b"", b"a", b"\x00\xffbin", "héllo".encode(), b"x" * 300, b"last"]
        out = np.empty(6, dtype=object)
        out[:] = values
        return out.reshape(SHAPE)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype)
    return np.array([[-1.5, 0.0, 3.25], [np.finfo(dtype).max, np.finfo(dtype).tiny, -0.125]], dtype=dtype)


def _utf8_sample() -> np.ndarray:
    out = np.empty(6, dtype=object)
    out[:] = [b"", b"a", "héllo".encode(), b"mid", b"x" * 300, b"last"]
    return out.reshape(SHAPE)


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_raw_round_trip_every_datatype(datatype):
    array = _sample(datatype)
    raw = encode_raw(array, datatype)
    if datatype != "BYTES":
        assert len(raw) == array.size * (1 if datatype == "BOOL" else DATATYPES[datatype].itemsize)
    _assert_same(decode_raw("T", datatype, list(SHAPE), raw), array)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_json_round_trip_every_datatype(datatype):
    array = _utf8_sample() if datatype == "BYTES" else _sample(datatype)
    data = encode_json_data(array, datatype)
    assert len(data) == array.size  # flat, row-major
    data = json.loads(json.dumps(data))  # through real JSON text
    _assert_same(decode_json_data("T", datatype, list(SHAPE), data), array)


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
def test_typed_values_round_trip(datatype):
    array = _sample(datatype)
    values = list(array.reshape(-1)) if datatype == "BYTES" else array.reshape(-1).tolist()
    _assert_same(decode_typed_values("T", datatype, SHAPE, values), array)


def test_raw_bytes_match_tritonclient_little_endian_and_length_prefixes():
    ints = np.array([1, -2, 258], dtype=np.int32)
    assert encode_raw(ints, "INT32") == struct.pack("<3i", 1, -2, 258)
    strings = np.array([b"ab", b"\x00\xff", b""], dtype=object)
    expected = b"\x02\x00\x00\x00ab" + b"\x02\x00\x00\x00\x00\xff" + b"\x00\x00\x00\x00"
    assert serialize_bytes(strings) == expected
    assert serialize_byte_tensor(strings).item() == expected  # the stock client agrees
    assert deserialize_bytes(expected, name="S", count=3).tolist() == [b"ab", b"\x00\xff", b""]


def test_nested_and_flat_json_data_decode_the_same():
    flat = decode_json_data("X", "FP32", [2, 2], [1, 2, 3.5, 4])
    nested = decode_json_data("X", "FP32", [2, 2], [[1, 2], [3.5, 4]])
    np.testing.assert_array_equal(flat, nested)
    assert flat.dtype == np.float32 and flat[1, 0] == 3.5
    strings = decode_json_data("S", "BYTES", [2, 1], [["a"], ["bc"]])
    assert strings.tolist() == [[b"a"], [b"bc"]]


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "needle"),
    [
        ("FP32", [2, 2], [1.0, 2.0, 3.0], "has 3 elements but shape [2, 2] needs 4"),
        ("FP32", [3], [1.0, float("nan"), 2.0], "non-finite value (nan) at flat index 1"),
        ("FP64", [2], [1.0, float("inf")], "non-finite"),
        ("FP16", [1], [1e6], "non-finite"),  # overflows FP16
        ("UINT8", [2], [1, 256], "outside the UINT8 range [0, 255]"),
        ("INT8", [1], [-129], "outside the INT8 range"),
        ("INT32", [2], [1, 2.5], "must hold integers, got float 2.5"),
        ("UINT64", [2], [2**64 - 1, -1], "outside the UINT64 range"),
        ("INT64", [2], [True, False], "must hold integers, got booleans"),
        ("UINT8", [1], ["7"], "must hold integers, got strings"),
        ("FP32", [2], [1, None], "must hold numbers"),
        ("BOOL", [2], [1, 0], "must hold true/false"),
        ("FP32", [3], [[1, 2], [3]], "not a regular array"),
        ("BYTES", [2], ["a", 3], "must hold JSON strings, got int"),
        ("FP32", [2], {"a": 1}, "must be a JSON array"),
        ("FLOAT32", [1], [1.0], "unsupported datatype 'FLOAT32'"),
        ("FP32", [-1], [1.0], "non-negative integers"),
        ("FP32", "2", [1.0, 2.0], "shape must be a list"),
    ],
)
def test_json_data_validation_names_the_tensor(datatype, shape, data, needle):
    with pytest.raises(OipError) as info:
        decode_json_data("IMAGE", datatype, shape, data)
    assert needle in str(info.value)
    assert "'IMAGE'" in str(info.value)
    assert info.value.field == "IMAGE"


def test_nan_in_json_text_is_refused():
    body = b'{"inputs":[{"name":"X","datatype":"FP32","shape":[2],"data":[1.0, NaN]}]}'
    with pytest.raises(OipError, match=r"tensor 'X' \(FP32\) holds a non-finite value"):
        parse_http_infer_request(body, model_name="m")


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "needle"),
    [
        ("FP32", [2], b"\x00" * 7, "has 7 bytes of data but shape [2] of FP32 needs 8 (2 elements x 4 bytes)"),
        ("FP32", [1], struct.pack("<f", float("nan")), "non-finite"),
        ("FP16", [1], np.array([np.inf], dtype="<f2").tobytes(), "non-finite"),
        ("BOOL", [2], b"\x01\x02", "byte other than 0 or 1"),
        ("BYTES", [2], b"\x01\x00\x00\x00a", "holds 1 length-prefixed elements but its shape needs 2"),
        ("BYTES", [1], b"\x05\x00\x00\x00ab", "element 0 declares 5 bytes but only 2 remain"),
        ("BYTES", [1], b"\x01\x00", "truncated 4-byte length prefix"),
    ],
)
def test_raw_validation(datatype, shape, raw, needle):
    with pytest.raises(OipError, match="'T'") as info:
        decode_raw("T", datatype, shape, raw)
    assert needle in str(info.value)


def test_typed_values_validation():
    with pytest.raises(OipError, match="FP16 tensor 'H' has no typed contents field; send it as raw bytes"):
        decode_typed_values("H", "FP16", [1], [1.0])
    with pytest.raises(OipError, match="outside the UINT8 range"):
        decode_typed_values("U", "UINT8", [2], [3, 300])
    with pytest.raises(OipError, match="has 1 elements but shape \\[2\\] needs 2"):
        decode_typed_values("U", "INT32", [2], [3])
    with pytest.raises(OipError, match="non-finite"):
        decode_typed_values("F", "FP32", [1], [float("-inf")])


def _client_inputs() -> tuple[list, dict[str, np.ndarray]]:
    arrays = {
        "IMAGE": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "SCALE": np.array([0.5, -2.0], dtype=np.float16),
        "NAMES": np.array([b"a", b"", b"\x00\x01"], dtype=object),
        "FLAGS": np.array([[True], [False]]),
    }
    datatypes = {"IMAGE": "UINT8", "SCALE": "FP16", "NAMES": "BYTES", "FLAGS": "BOOL"}
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array, binary_data=name != "FLAGS")  # FLAGS as JSON data, the rest binary
        inputs.append(tensor)
    return inputs, arrays


def test_parse_binary_request_built_by_stock_tritonclient():
    inputs, arrays = _client_inputs()
    outputs = [httpclient.InferRequestedOutput("MASK", binary_data=False)]
    body, json_size = _get_inference_request(
        inputs=inputs, request_id="r1", outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters={"threshold": 0.25},
    )
    assert json_size is not None and json_size < len(body)
    request = parse_http_infer_request(body, model_name="segment", header_length=str(json_size))
    assert request.id == "r1" and request.model_name == "segment"
    assert request.parameters == {"threshold": 0.25}
    assert [t.name for t in request.inputs] == list(arrays)
    for tensor in request.inputs:
        _assert_same(tensor.data, arrays[tensor.name])
    assert request.outputs == (RequestedOutput("MASK", False, {"binary_data": False}),)
    assert request.wants_binary("MASK") is False


def test_parse_plain_json_request_without_header_length():
    document = {"inputs": [{"name": "X", "shape": [2], "datatype": "INT64", "data": [5, -6]}]}
    request = parse_http_infer_request(json.dumps(document).encode(), model_name="m", model_version="3")
    assert request.model_version == "3" and request.outputs == () and not request.binary_data_output
    np.testing.assert_array_equal(request.inputs[0].data, np.array([5, -6], dtype=np.int64))


def _binary_body(sizes: list[int], payload: bytes) -> tuple[bytes, int]:
    document = {
        "inputs": [
            {"name": f"I{i}", "shape": [size], "datatype": "UINT8", "parameters": {"binary_data_size": size}}
            for i, size in enumerate(sizes)
        ]
    }
    header = json.dumps(document).encode()
    return header + payload, len(header)


@pytest.mark.parametrize(
    ("sizes", "payload", "header_delta", "needle"),
    [
        ([2, 2], b"\x01\x02\x03\x04\x05", 0, "1 bytes after the JSON header are not claimed"),
        ([2, 4], b"\x01\x02\x03", 0, "input 'I1' binary_data_size 4 runs past the end of the body (1 bytes"),
        ([2], b"\x01\x02", 10_000, "Inference-Header-Content-Length 10"),
        ([2], b"\x01\x02", -10_000, "Inference-Header-Content-Length"),
    ],
)
def test_binary_extension_size_errors(sizes, payload, header_delta, needle):
    body, header_length = _binary_body(sizes, payload)
    length = max(header_length + header_delta, 0)
    with pytest.raises(OipError) as info:
        parse_http_infer_request(body, model_name="m", header_length=length)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ({"inputs": []}, "non-empty 'inputs' array"),
        ([1, 2], "must be a JSON object"),
        ({"inputs": [{"shape": [1], "datatype": "UINT8", "data": [1]}]}, "needs a non-empty string 'name'"),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "UINT8"}]}, "neither 'data' nor"),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "UINT8", "data": [1]}] * 2}, "more than once"),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "UINT8", "data": [1],
                      "parameters": {"shared_memory_region": "r"}}]}, "shared memory"),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}}]},
         "no Inference-Header-Content-Length header"),
        ({"id": 5, "inputs": [{"name": "A", "shape": [1], "datatype": "UINT8", "data": [1]}]}, "id must be"),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "UINT8", "data": [1]}],
          "outputs": [{"name": "M", "parameters": {"binary_data": "yes"}}]}, "binary_data must be true or false"),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "UINT8", "data": [1]}],
          "outputs": [{"name": "M", "parameters": {"classification": 3}}]}, "classification"),
    ],
)
def test_request_structure_errors(document, needle):
    with pytest.raises(OipError) as info:
        parse_http_infer_request(json.dumps(document).encode(), model_name="m")
    assert needle in str(info.value)


def test_invalid_json_and_deep_nesting_are_client_errors():
    with pytest.raises(OipError, match="not valid JSON"):
        parse_http_infer_request(b"{not json", model_name="m")
    with pytest.raises(OipError, match="not valid JSON"):
        parse_http_infer_request(b"\xff\xfe", model_name="m")
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(OipError, match="too deeply"):
        parse_http_infer_request(deep, model_name="m")


def _response(text: tuple[bytes, ...] = (b"ok", b"\x00\xff")) -> tuple[InferResponse, dict[str, np.ndarray]]:
    arrays = {
        "MASK": np.array([[0, 1], [1, 1]], dtype=np.uint8),
        "PROBABILITY": np.array([[0.1, 0.9], [0.75, 1.0]], dtype=np.float32),
        "HALF": np.array([0.5, -1.0], dtype=np.float16),
        "TEXT": np.array(text, dtype=object),
    }
    datatypes = {"MASK": "UINT8", "PROBABILITY": "FP32", "HALF": "FP16", "TEXT": "BYTES"}
    outputs = tuple(InferTensor(n, datatypes[n], a) for n, a in arrays.items())
    return InferResponse(model_name="segment", model_version="v1", id="42", outputs=outputs), arrays


def test_binary_response_decodes_with_stock_tritonclient():
    response, arrays = _response()
    request = InferRequest(model_name="segment", parameters={"binary_data_output": True})
    body, header_length = encode_http_infer_response(response, request)
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["id"] == "42" and header["model_version"] == "v1"
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in header["outputs"])
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    for name, array in arrays.items():
        _assert_same(result.as_numpy(name), array)


def test_per_output_binary_flag_overrides_request_default():
    response, arrays = _response()
    request = InferRequest(
        model_name="segment",
        parameters={"binary_data_output": True},
        outputs=(RequestedOutput("PROBABILITY", binary_data=False), RequestedOutput("MASK")),
    )
    body, header_length = encode_http_infer_response(response, request)
    header = json.loads(body[:header_length])
    by_name = {o["name"]: o for o in header["outputs"]}
    assert by_name["PROBABILITY"]["data"] == pytest.approx([0.1, 0.9, 0.75, 1.0])
    assert by_name["MASK"]["parameters"] == {"binary_data_size": 4}
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    _assert_same(result.as_numpy("PROBABILITY"), arrays["PROBABILITY"])
    _assert_same(result.as_numpy("MASK"), arrays["MASK"])


def test_json_response_without_binary():
    response, arrays = _response(text=(b"ok", "é".encode()))
    body, header_length = encode_http_infer_response(response, InferRequest(model_name="segment"))
    assert header_length is None
    document = json.loads(body)
    by_name = {o["name"]: o for o in document["outputs"]}
    assert by_name["MASK"] == {"name": "MASK", "datatype": "UINT8", "shape": [2, 2], "data": [0, 1, 1, 1]}
    assert by_name["HALF"]["data"] == [0.5, -1.0]
    assert by_name["TEXT"]["data"] == ["ok", "é"]
    result = httpclient.InferResult.from_response_body(body)
    _assert_same(result.as_numpy("MASK"), arrays["MASK"])
    _assert_same(result.as_numpy("PROBABILITY"), arrays["PROBABILITY"])


def test_non_utf8_bytes_output_must_be_binary():
    response, _ = _response()
    with pytest.raises(OipError, match="BYTES output 'TEXT' is not UTF-8"):
        encode_http_infer_response(response, InferRequest(model_name="segment"))


def test_non_finite_output_is_a_server_fault_not_a_client_error():
    outputs = (InferTensor("PROBABILITY", "FP32", np.array([0.5, np.nan], dtype=np.float32)),)
    with pytest.raises(RuntimeError, match="non-finite"):
        encode_http_infer_response(InferResponse(model_name="m", outputs=outputs), InferRequest(model_name="m"))
