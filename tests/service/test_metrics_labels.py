"""Bounded metric labels: ``medrefine_requests_total`` tells OIP models apart by a ``model`` label whose
values are the registry's names (made-up names count as ``unknown``), and BentoML's ``bentoml_service_*``
series are labelled by route, so requests to made-up paths add no series to /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from service.bentoml_metrics import OTHER, endpoint_label
from service.metrics import UNKNOWN_MODEL, model_label

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s+\S+$")


def _series(server) -> set[str]:
    """Every sample on /metrics as ``name{labels}`` (values dropped)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = set()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            found.add(match.group(1) + (match.group(2) or ""))
    return found


def _made_up_requests(server, count: int, tag: str) -> None:
    """``count`` requests to distinct paths the service does not have, of four kinds."""
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
        for i in range(count):
            kind = i % 4
            if kind == 0:
                client.get(f"/x%0A{tag}{i}")
            elif kind == 1:
                client.get(f"/v2/models/made-up-{tag}{i}/ready")
            elif kind == 2:
                client.get(f"/ui/nope-{tag}{i}.js")
            else:
                client.post(f"/v2/nothing/{tag}{i}", content=b"{}")


def test_model_label_keeps_registry_names_and_bounds_the_rest():
    known = ("segment", "generate", "synthesize")
    assert model_label("generate", known) == "generate"
    assert model_label("made-up\n", known) == UNKNOWN_MODEL
    assert model_label("", known) == "" and model_label(None, known) == ""


def test_endpoint_label_maps_paths_to_route_templates():
    routes = {"/segment", "/refine"}
    assert endpoint_label("/segment", routes) == "/segment"
    assert endpoint_label("/readyz", routes) == "/readyz"
    assert endpoint_label("/v2/models/anything/infer", routes) == "/v2/models/{model}/infer"
    assert endpoint_label("/v2/models/a/versions/7/ready", routes) == "/v2/models/{model}/versions/{version}/ready"
    assert endpoint_label("/ui/app.js", routes) == "/ui/"
    assert endpoint_label("/segment/../x\n", routes) == OTHER
    assert endpoint_label("/v2/models/a/b/c", routes) == OTHER


def test_fifty_made_up_paths_add_no_series(live_server):
    _made_up_requests(live_server, 4, "warm")  # each kind once: the bounded series exist from here on
    before = _series(live_server)
    assert any(name.startswith("bentoml_service_request_total{") for name in before)  # BentoML's own stay
    _made_up_requests(live_server, 50, "new")
    after = _series(live_server)
    assert sorted(after - before) == []
    assert not any("made-up" in name or "nope-" in name or "%0A" in name for name in after)


def test_oip_requests_are_told_apart_by_model(live_server):
    headers = live_server.headers()
    with httpx.Client(base_url=live_server.url, headers=headers, timeout=30) as client:
        assert client.get("/v2/models/segment").status_code == 200
        assert client.get("/v2/models/generate").status_code == 200
        assert client.get("/v2/models/made-up-0").status_code == 404
    grpc = grpcclient.InferenceServerClient(live_server.grpc_address)
    grpc_headers = {"x-api-key": live_server.api_key}
    assert grpc.get_model_metadata("segment", headers=grpc_headers).name == "segment"
    assert grpc.get_model_metadata("generate", headers=grpc_headers).name == "generate"
    with pytest.raises(InferenceServerException):
        grpc.get_model_metadata("made-up-0", headers=grpc_headers)
    before = _series(live_server)
    for model in ("segment", "generate"):
        assert (f'medrefine_requests_total{{endpoint="/v2/models/{{model}}",model="{model}",protocol="oip-http",'
                f'status="200"}}') in before
        assert f'medrefine_requests_total{{endpoint="ModelMetadata",model="{model}",protocol="grpc",status="200"}}' \
            in before

    with httpx.Client(base_url=live_server.url, headers=headers, timeout=30) as client:
        for i in range(1, 51):
            assert client.get(f"/v2/models/made-up-{i}").status_code == 404
    for i in range(1, 11):
        with pytest.raises(InferenceServerException):
            grpc.get_model_metadata(f"made-up-{i}", headers=grpc_headers)
    grpc.close()
    after = _series(live_server)
    assert sorted(after - before) == []
    assert 'medrefine_requests_total{endpoint="/v2/models/{model}",model="unknown",protocol="oip-http",' \
           'status="404"}' in after
    assert 'medrefine_requests_total{endpoint="ModelMetadata",model="unknown",protocol="grpc",status="404"}' in after
