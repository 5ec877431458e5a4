"""The error contract kept everywhere (issue #15, item 11): every client error names the request's own
field (or, on ``/v2``, the tensor) in its documented shape, and reaches the log as one line, not a traceback.

Through the session's real server (``live_server``, generators on): ``/refine`` ``prior_mask`` errors name
``prior_mask`` (not ``file``); ``/generate`` errors name ``prompt``, ``modality``, ``negative_prompt`` and
``best_of`` (not the runtime's ``prompts``, ``modalities``, ``negative_prompts``, ``candidates``); JSON
``true`` is not a number for ``seed``, ``steps``, ``num_images``, ``best_of`` or ``guidance_scale``; ``/v2``
shape errors name the tensor in our words, never numpy's.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.bad_inputs import pil_bytes

PROMPT = {"prompt": "chest x-ray, left lower lobe nodule", "modality": "chest_xray", "steps": 2}
_IMAGE = pil_bytes((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8), "PNG")
_MASK = pil_bytes(np.pad(np.full((16, 16), 255, np.uint8), 24), "PNG")


@pytest.fixture
def fresh_log(live_server):
    """The server log written during the test (the session's server is shared)."""
    start = len(live_server.log())
    return lambda: live_server.log()[start:]


def _assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log and "[ERROR]" not in log, log[-3000:]


@pytest.mark.parametrize(
    ("prior", "status", "needle"),
    [
        (b"not an image at all", 415, "not an image"),
        (_MASK[: len(_MASK) // 2], 400, "prior_mask"),  # a truncated PNG
    ],
    ids=["not_an_image", "truncated_png"],
)
def test_prior_mask_errors_name_prior_mask(live_server, fresh_log, prior, status, needle):
    with live_server.client() as client:
        response = client.post("/refine", files={"file": ("i.png", _IMAGE, "image/png"),
                                                 "prior_mask": ("m.png", prior, "image/png")})
    assert response.status_code == status, response.text
    assert response.json()["field"] == "prior_mask" and needle in response.json()["error"], response.text
    _assert_no_traceback(fresh_log())


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"modality": "pet"}, "modality", "modality: unknown modality 'pet'"),
        ({"prompt": "x" * 301}, "prompt", "prompt: has 301 characters"),
        ({"prompt": "word " * 40}, "prompt", "tokens"),
        ({"prompt": "   "}, "prompt", "empty"),
        ({"negative_prompt": "x" * 301}, "negative_prompt", "negative_prompt: has 301 characters"),
        ({"best_of": 0}, "best_of", "best_of: 0; expected an integer"),
        ({"best_of": 2, "num_images": 2}, "best_of", "best_of"),
        ({"best_of": 2, "rank_by": "reward"}, "rank_by", "needs a reward model"),  # the default has none
        ({"best_of": 2, "rank_by": "rating"}, "rank_by", "rank_by: 'rating'; expected one of"),
        ({"rank_by": "selector"}, "rank_by", "without best_of"),
        ({"seed": True}, "seed", "integer"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"steps": True}, "steps", "integer"),
        ({"num_images": True}, "num_images", "integer"),
        ({"best_of": True}, "best_of", "integer"),
        ({"guidance_scale": True}, "guidance_scale", "number"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_generate_errors_name_the_request_fields(live_server, fresh_log, change, field, needle):
    with live_server.client() as client:
        response = client.post("/generate", json=PROMPT | change)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error", "field"} and body["field"] == field and needle in body["error"], body
    for internal in ("prompts", "modalities", "negative_prompts", "candidates"):
        assert internal not in body["error"].split(":")[0], body
    _assert_no_traceback(fresh_log())


def test_generate_accepts_plain_integers_and_numbers(live_server):
    with live_server.client() as client:
        response = client.post("/generate", json=PROMPT | {"seed": 7, "steps": 2, "num_images": 1,
                                                           "guidance_scale": 2})
    assert response.status_code == 200, response.text
    assert response.json()["seed"] == 7


@pytest.mark.parametrize(
    ("model", "tensor", "shape", "data", "needle"),
    [
        ("segment", "IMAGE", [2, 2], [[1, 2], [3]], "same length"),
        ("segment", "IMAGE", [2, 2], [[1, 2], [3, 4], [5]], "same length"),
        ("synthesize", "MASK", [2, 2], [[1, 2], [3]], "same length"),
        ("segment", "IMAGE", [2**40, 2**40, 0], [], "too large"),
        ("segment", "IMAGE", [0, 2**63], [], "too large"),
        ("synthesize", "MASK", [0, 10**30], [], "too large"),
    ],
    ids=["ragged", "ragged_rows", "ragged_mask", "huge_empty", "dim_past_int64", "dim_past_numpy"],
)
def test_v2_shape_errors_name_the_tensor_in_our_words(live_server, fresh_log, model, tensor, shape, data, needle):
    with live_server.client() as client:
        response = client.post(f"/v2/models/{model}/infer",
                               json={"inputs": [{"name": tensor, "datatype": "UINT8", "shape": shape, "data": data}]})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"}, body  # the /v2 error shape
    assert f"'{tensor}'" in body["error"] and needle in body["error"], body
    for numpy_words in ("inhomogeneous", "arr.size", "Maximum allowed dimension", "sequence"):
        assert numpy_words not in body["error"], body
    _assert_no_traceback(fresh_log())
