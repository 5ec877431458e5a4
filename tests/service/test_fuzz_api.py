"""Schema-driven fuzzing of every HTTP endpoint of a live server: no 5xx, no hang, no leaked internals.

The schema is the one the server publishes (BentoML's ``/docs.json``: ``/segment``, ``/refine``, the
probes and ``/metrics``) plus the KServe v2 routes, which BentoML does not list (``OIP_PATHS`` below:
an OpenAPI rendering of the v2 REST protocol for the ``segment`` model). Schemathesis generates
schema-conforming (positive) and schema-violating (negative) requests; ``format: binary`` fields (the
uploads) draw from ``upload_bytes()``: valid small PNG/JPEG/DICOM images, truncated and bit-flipped ones,
and random bytes, so option handling is exercised behind a successful decode too.

Every request has a 10 s client timeout (a hang fails the test); the run is derandomized so CI sees the
same cases each time. At least ``MIN_CASES`` requests are sent in total.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.specs.openapi.formats import unregister_string_format

from tests.support.bad_inputs import assert_no_leak, dicom_bytes

pytestmark = pytest.mark.timeout(400)

MIN_CASES = 500
REQUEST_TIMEOUT_S = 10.0
# Examples per operation and generation mode; GET routes without parameters yield few distinct cases.
BUDGET = {"/segment": 250, "/refine": 200, "/v2/models/{model}/infer": 200,
          "/v2/models/{model}/versions/{version}/infer": 25}
DEFAULT_BUDGET = 12

# ----------------------------------------------------------------------------------------------------------
# The KServe v2 routes as OpenAPI (BentoML's /docs.json does not list mounted apps)
# ----------------------------------------------------------------------------------------------------------

_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "enum": ["segment", "nope"]}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 70}}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string", "enum": ["IMAGE", "PIXELS"]},
        "shape": {"type": "array", "maxItems": 4, "items": {"type": "integer", "minimum": 0, "maximum": 8}},
        "datatype": {"type": "string", "enum": ["UINT8", "FP32", "FP16", "INT64", "BOOL", "BYTES"]},
        "data": {"type": "array", "maxItems": 64, "items": {"type": "number"}},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
    },
}
# A well-formed 4 x 4 gray image: JSON Schema cannot tie len(data) to prod(shape), so without this branch
# almost no generated request would reach the model.
_VALID_IMAGE = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string", "enum": ["IMAGE"]},
        "shape": {"type": "array", "items": {"type": "integer", "enum": [4]}, "minItems": 2, "maxItems": 2},
        "datatype": {"type": "string", "enum": ["UINT8"]},
        "data": {"type": "array", "minItems": 16, "maxItems": 16,
                 "items": {"type": "integer", "minimum": 0, "maximum": 255}},
    },
}
_INFER_BODY = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "maxLength": 16},
        "parameters": {"type": "object", "properties": {"threshold": {"type": "number"},
                                                        "binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"anyOf": [_VALID_IMAGE, _TENSOR]}},
        "outputs": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "enum": ["MASK", "PROBABILITY", "BOX", "IOU", "HEATMAP"]},
                           "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}},
    },
}
_ANSWERS = {"200": {"description": "OK"}, "400": {"description": "invalid"}, "404": {"description": "unknown"}}


def _get(parameters=()):
    return {"get": {"parameters": list(parameters), "responses": _ANSWERS}}


def _infer(parameters):
    return {"post": {"parameters": list(parameters), "responses": _ANSWERS,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _INFER_BODY}}}}}


OIP_PATHS = {
    "/v2": _get(),
    "/v2/health/live": _get(),
    "/v2/health/ready": _get(),
    "/v2/models/{model}": _get([_MODEL]),
    "/v2/models/{model}/ready": _get([_MODEL]),
    "/v2/models/{model}/versions/{version}": _get([_MODEL, _VERSION]),
    "/v2/models/{model}/infer": _infer([_MODEL]),
    "/v2/models/{model}/versions/{version}/infer": _infer([_MODEL, _VERSION]),
}

# ----------------------------------------------------------------------------------------------------------
# Upload bytes
# ----------------------------------------------------------------------------------------------------------


def _encoded(height: int, width: int, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width)) * 255).astype(np.uint8)
    if fmt == "DICOM":
        return dicom_bytes(pixels=pixels, patient_name="Fuzz^Case")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _flip(data: bytes, position: float, value: int) -> bytes:
    index = min(len(data) - 1, int(position * len(data)))
    return data[:index] + bytes([value]) + data[index + 1:]


def upload_bytes() -> st.SearchStrategy[bytes]:
    """Valid small images, damaged ones, and noise."""
    sizes = st.integers(8, 72)
    valid = st.builds(_encoded, sizes, sizes, st.integers(0, 2**16), st.sampled_from(["PNG", "JPEG", "DICOM"]))
    cut = st.builds(lambda data, at: data[: max(1, int(at * len(data)))], valid, st.floats(0.0, 0.99))
    flipped = st.builds(_flip, valid, st.floats(0.0, 1.0), st.integers(0, 255))
    return st.one_of(valid, valid, cut, flipped, st.binary(max_size=600))


# ----------------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------------


def as_openapi30(node):
    """BentoML publishes pydantic's JSON-Schema bounds (numeric ``exclusiveMinimum``) in an OpenAPI 3.0.2
    document, where they must be ``minimum`` + ``exclusiveMinimum: true``; rewrite them in place."""
    if isinstance(node, dict):
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            value = node.get(bound)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                node[plain], node[bound] = value, True
        for child in node.values():
            as_openapi30(child)
    elif isinstance(node, list):
        for child in node:
            as_openapi30(child)
    return node


# /refine prompts drawn inside the smallest generated image (8 x 8 pixels), so that positive cases can
# pass the prompt checks and reach the model; negative cases still send anything.
_REFINE_PROMPTS = {
    "box": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "number", "minimum": 0, "maximum": 8}},
    "points": {"type": "array", "minItems": 1, "maxItems": 3,
               "items": {"type": "array", "minItems": 2, "maxItems": 2,
                         "items": {"type": "number", "minimum": 0, "maximum": 8}}},
    "point_labels": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "integer", "enum": [0, 1]}},
    "prior_mask": {"type": "array", "maxItems": 1, "items": {"type": "string", "format": "binary"}},
}


def steer_refine_prompts(operation: dict) -> None:
    """Replace the generic prompt schemas of ``POST /refine`` by in-image ones; a box is always sent."""
    for media in operation["requestBody"]["content"].values():
        media["schema"]["required"] = sorted({*media["schema"].get("required", ()), "file", "box"})
        properties = media["schema"].get("properties", {})
        for name, schema in _REFINE_PROMPTS.items():
            if name in properties:
                properties[name] = {**schema, "description": properties[name].get("description", "")}


@pytest.fixture(scope="module")
def fuzz_schema(live_server):
    published = httpx.get(live_server.url + "/docs.json", timeout=30)
    assert published.status_code == 200, published.text
    raw = published.json()
    assert {"/segment", "/refine"} <= set(raw["paths"]), "BentoML no longer publishes the REST endpoints"
    raw["paths"].update(OIP_PATHS)
    as_openapi30(raw)
    steer_refine_prompts(raw["paths"]["/refine"]["post"])
    schemathesis.openapi.format("binary", upload_bytes())
    try:
        yield schemathesis.openapi.from_dict(raw)
    finally:
        unregister_string_format("binary")


def _fuzz(strategy, examples: int, send_one) -> None:
    """Draw ``examples`` cases from ``strategy`` (derandomized: the same cases every run) and send each."""

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        send_one(case)

    run()


def test_fuzz_every_endpoint_no_5xx_no_hang(live_server, fuzz_schema):
    statuses: Counter[int] = Counter()
    per_operation: Counter[str] = Counter()
    failures: list[str] = []
    slowest = [0.0]
    auth = live_server.headers()
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/segment", "/refine", "/readyz", "/metrics", "/v2/models/{model}/infer"} <= paths

    def sender(label: str):
        def send_one(case) -> None:
            before = time.monotonic()
            response = case.call(base_url=live_server.url, headers=auth, timeout=REQUEST_TIMEOUT_S)
            slowest[0] = max(slowest[0], time.monotonic() - before)
            statuses[response.status_code] += 1
            per_operation[f"{label} {response.status_code}"] += 1
            if response.status_code >= 500:
                failures.append(f"{label}: {response.status_code} {response.text[:300]}\n"
                                f"    {case.as_curl_command(headers=auth)[:600]}")
            if response.status_code >= 400:
                assert_no_leak(response.text)

        return send_one

    started = time.monotonic()
    for operation in operations:
        budget = BUDGET.get(operation.path, DEFAULT_BUDGET)
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            examples = budget if mode is GenerationMode.POSITIVE else max(budget // 3, 5)
            label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
            _fuzz(operation.as_strategy(generation_mode=mode), examples, sender(label))
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    report = (f"{total} requests in {elapsed:.1f} s, statuses {dict(sorted(statuses.items()))}, "
              f"slowest {slowest[0]:.2f} s")
    print(report)
    print("\n".join(f"  {label}: {count}" for label, count in sorted(per_operation.items())))
    assert not failures, "server errors:\n" + "\n".join(failures[:10])
    assert total >= MIN_CASES, report
    assert statuses[200] >= 50, f"too few requests got through to the model: {report}"
    assert httpx.get(live_server.url + "/readyz", timeout=10).status_code == 200  # still serving
