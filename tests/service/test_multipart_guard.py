"""The multipart guard sees the parts the app will see (python-multipart, Starlette's parser): an upload
field sent as text (quoted or not), with only ``filename*``, a second ``name`` parameter, or twice, never
reaches BentoML (which would fetch a text value as a URL, or keep one of two files) — 400 naming the field
(issue 15, item 10)."""

from __future__ import annotations

import pytest

from service.middleware.multipart import MultipartGuard

pytestmark = pytest.mark.timeout(300)

BOUNDARY = "guardboundary"
PNG_PART = b'form-data; name="file"; filename="a.png"'


def _part(disposition: bytes, data: bytes) -> bytes:
    return (b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: " + disposition
            + b"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")


def _body(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def _guard_verdict(body: bytes, chunk: int = 7):
    guard = MultipartGuard(BOUNDARY.encode())
    for start in range(0, len(body), chunk):  # header lines split across chunks, as on the wire
        problem = guard.feed(body[start:start + chunk], start + chunk < len(body))
        if problem is not None:
            return problem
    return None


BYPASSES = {
    "unquoted name": _body(_part(b"form-data; name=file", b"http://127.0.0.1:9/x.png")),
    "filename* only": _body(_part(b"form-data; name=\"file\"; filename*=UTF-8''a.png", b"http://127.0.0.1:9/")),
    "second name parameter": _body(_part(b'form-data; name="x"; name="file"', b"http://127.0.0.1:9/")),
    "upper-case NAME": _body(_part(b'form-data; NAME="file"', b"http://127.0.0.1:9/")),
    "file twice": _body(_part(PNG_PART, b"one"), _part(b'form-data; name="file"; filename="b.png"', b"two")),
}


@pytest.mark.parametrize("case", sorted(BYPASSES))
def test_guard_refuses_each_bypass_naming_file(case):
    problem = _guard_verdict(BYPASSES[case])
    assert problem is not None and problem.code == 400
    assert problem.field == "file"


def test_guard_passes_well_formed_bodies_and_reads_no_headers_inside_file_data():
    embedded = b"x\r\nContent-Disposition: form-data; name=file\r\n\r\n--notours--"
    assert _guard_verdict(_body(_part(PNG_PART, embedded))) is None
    assert _guard_verdict(_body(_part(b'form-data; name="threshold"', b"0.4"), _part(PNG_PART, b"img"))) is None


def test_guard_refuses_unnamed_parts_and_truncated_or_foreign_bodies():
    for body in (_body(_part(b"form-data; name*=UTF-8''file", b"x")), _body(_part(PNG_PART, b"img"), close=False),
                 b"not multipart at all"):
        problem = _guard_verdict(body)
        assert problem is not None and problem.code == 400
        assert "malformed multipart/form-data" in problem.message


@pytest.mark.parametrize("case", sorted(BYPASSES))
def test_live_server_answers_400_naming_file_for_each_bypass(live_server, case):
    body = BYPASSES[case]
    headers = {**live_server.headers(), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with live_server.client(timeout=60) as client:
        response = client.post("/segment", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "file"


IMAGE_PART = b'form-data; name="image"; filename="a.png"'


def _route_verdict(body: bytes, uploads: frozenset[str], texts: frozenset[str] = frozenset({"threshold"})):
    guard = MultipartGuard(BOUNDARY.encode(), (texts | uploads) if uploads else frozenset(), uploads)
    return guard.feed(body, False)


def test_a_misnamed_image_is_400_naming_file_and_the_name_it_came_under():
    problem = _route_verdict(_body(_part(IMAGE_PART, b"png")), frozenset({"file"}))
    assert problem is not None and problem.code == 400 and problem.field == "file"
    assert "'image'" in problem.message and "file=@" in problem.message
    # Beside a proper file, a stray file part is named itself.
    stray = _route_verdict(_body(_part(PNG_PART, b"png"), _part(IMAGE_PART, b"png")), frozenset({"file"}))
    assert stray is not None and stray.field == "image" and "'file'" in stray.message
    # The route's own upload fields pass, and routes that read their forms themselves are not checked here.
    prior = b'form-data; name="prior_mask"; filename="m.png"'
    assert _route_verdict(_body(_part(PNG_PART, b"png"), _part(prior, b"m")), frozenset({"file", "prior_mask"})) is None
    assert _route_verdict(_body(_part(IMAGE_PART, b"png")), frozenset()) is None


def test_a_misspelt_option_is_400_naming_it_not_silently_ignored():
    typo = _route_verdict(_body(_part(b'form-data; name="treshold"', b"0.3"), _part(PNG_PART, b"png")),
                          frozenset({"file"}))
    assert typo is not None and typo.field == "treshold" and "'threshold'" in typo.message
    fine = _route_verdict(_body(_part(b'form-data; name="threshold"', b"0.3"), _part(PNG_PART, b"png")),
                          frozenset({"file"}))
    assert fine is None


def test_each_multipart_routes_fields_and_upload_fields_are_its_api_inputs():
    from service.app import MedRefine
    from service.middleware.policy import REST_POLICIES

    for api in MedRefine.apis.values():
        policy = REST_POLICIES[api.route]
        if not policy.multipart:
            continue
        fields = api.input_spec.model_fields
        assert policy.fields == set(fields), api.route
        assert policy.uploads == {name for name, info in fields.items() if "Path" in str(info.annotation)}


@pytest.mark.parametrize("route", ["/segment", "/refine", "/synthesize"])
def test_live_server_names_file_when_the_image_comes_as_image(live_server, route):
    with live_server.client(timeout=60) as client:
        response = client.post(route, files={"image": ("p.png", b"\x89PNG\r\n\x1a\n")})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "file" and "'image'" in response.json()["error"]


def test_live_server_names_a_misspelt_option(live_server):
    from tests.support.bad_inputs import phantom_png

    png = phantom_png()
    with live_server.client(timeout=60) as client:
        response = client.post("/segment", files={"file": ("p.png", png)}, data={"treshold": "0.3"})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "treshold"
