"""POST /feedback/segmentation and its reads over a platform on tmp_path (the routes as the server mounts them,
through Starlette's test client): the stored mask is the sent mask, the image is de-identified, bad fields are
4xx naming the field, keys as the other platform routes, MEDREFINE_FEEDBACK=off answers 404, snapshots."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from starlette.testclient import TestClient

from core.imageio import decode_image, encode_mask_png, encode_png
from core.phantoms import breast_ultrasound
from medplatform.registry import ensure_default_registered
from service.platform_api import PlatformState, create_platform_app
from service.settings import ServiceSettings
from tests.support.platform_fixtures import make_platform

API_KEY, ADMIN_KEY = "api-key-0123456789", "admin-key-0123456789"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("feedback_api")
    platform = make_platform(root, mp)
    ensure_default_registered(platform.registry)  # default v1 = production: a version to name
    settings = ServiceSettings(api_key=API_KEY, admin_key=ADMIN_KEY)
    state = PlatformState(platform=platform)
    client = TestClient(create_platform_app(state, settings=lambda: settings))
    yield {"platform": platform, "client": client}
    mp.undo()


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def _phantom(seed: int = 3, size: int = 96) -> tuple[bytes, np.ndarray]:
    image, mask = breast_ultrasound(seed, size=size)
    return encode_png(image), mask.astype(np.uint8)


def _post(client, image: bytes, mask: bytes, *, model: str = "default:1", seconds: str = "12.5",
          prompts: str = "3", headers=None, **fields: str):
    data = {"model_version": model, "seconds": seconds, "prompts": prompts, **fields}
    files = {"image": ("case.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}
    return client.post("/feedback/segmentation", data=data, files=files,
                       headers=_admin() if headers is None else headers)


def test_saved_case_reads_back_with_the_exact_mask(world):
    client = world["client"]
    image, mask = _phantom()
    edited = mask.copy()
    edited[10:14, 20:30] = 1 - edited[10:14, 20:30]  # a correction the model would not have made
    response = _post(client, image, encode_mask_png(edited), dataset="ward-7")
    assert response.status_code == 201, response.text
    case = response.json()
    assert case["model_version"] == "default:1" and case["prompts"] == 3 and case["seconds"] == 12.5
    assert case["dataset"] == "ward-7" and case["details"]["mask_pixels"] == int(edited.sum())
    read = {"Authorization": f"Bearer {API_KEY}"}  # reads take the inference key
    stored = client.get(f"/feedback/segmentation/{case['id']}/mask", headers=read)
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), edited * 255)
    pixels = decode_image(client.get(f"/feedback/segmentation/{case['id']}/image", headers=read).content).pixels
    assert np.abs(pixels * 255 - decode_image(image).pixels * 255).max() < 0.51  # same 8-bit values
    listed = client.get("/feedback/segmentation", params={"dataset": "ward-7"}, headers=read).json()
    assert [c["id"] for c in listed] == [case["id"]]


def test_production_alias_is_pinned_to_its_version(world):
    image, mask = _phantom(4)
    response = _post(world["client"], image, encode_mask_png(mask), model="default@production")
    assert response.status_code == 201 and response.json()["model_version"] == "default:1"


def test_dicom_image_is_stored_deidentified(world):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.OtherPatientNames = "Roe^Richard"
    buffer = io.BytesIO()
    source.save_as(buffer)
    mask = np.zeros((source.Rows, source.Columns), np.uint8)
    mask[40:60, 30:50] = 1
    response = _post(world["client"], buffer.getvalue(), encode_mask_png(mask))
    assert response.status_code == 201, response.text
    stored = world["client"].get(f"/feedback/segmentation/{response.json()['id']}/image", headers=_admin())
    anonymous = pydicom.dcmread(io.BytesIO(stored.content))
    assert str(source.PatientName) and str(anonymous.PatientName) == "" and anonymous.PatientID == ""
    assert "OtherPatientNames" not in anonymous and anonymous.PatientIdentityRemoved == "YES"
    assert np.array_equal(anonymous.pixel_array, source.pixel_array)


@pytest.mark.parametrize(("change", "field", "status"), [
    ("mask_size", "mask", 400),
    ("mask_gray", "mask", 400),
    ("mask_jpeg", "mask", 400),
    ("image_text", "image", 400),
    ("unknown_version", "model_version", 404),
    ("bad_version", "model_version", 400),
    ("seconds", "seconds", 400),
    ("prompts", "prompts", 400),
    ("dataset", "dataset", 400),
    ("no_mask", "mask", 400),
])
def test_bad_fields_are_refused_naming_the_field(world, change, field, status):
    image, mask = _phantom()
    mask_png, kwargs = encode_mask_png(mask), {}
    if change == "mask_size":
        mask_png = encode_mask_png(mask[:, :-1])
    elif change == "mask_gray":
        gray = mask * 255
        gray[0, 0] = 128  # not binary
        mask_png = encode_png(gray.astype(np.uint8))
    elif change == "mask_jpeg":
        out = io.BytesIO()
        Image.fromarray(mask * 255).save(out, format="JPEG")
        mask_png = out.getvalue()
    elif change == "image_text":
        image = b"name,dice\na,0.9\n"
    elif change == "unknown_version":
        kwargs["model"] = "default:99"
    elif change == "bad_version":
        kwargs["model"] = "default:one"
    elif change == "seconds":
        kwargs["seconds"] = "-3"
    elif change == "prompts":
        kwargs["prompts"] = "2.5"
    elif change == "dataset":
        kwargs["dataset"] = "x" * 300
    if change == "no_mask":
        response = world["client"].post("/feedback/segmentation", headers=_admin(), data={
            "model_version": "default:1", "seconds": "1", "prompts": "0"},
            files={"image": ("a.png", image, "image/png")})
    else:
        response = _post(world["client"], image, mask_png, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


def test_keys_as_the_other_platform_routes(world):
    image, mask = _phantom()
    for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}):  # saving changes the platform: admin key
        assert _post(world["client"], image, encode_mask_png(mask), headers=headers).status_code == 401
    assert world["client"].get("/feedback/segmentation").status_code == 401
    assert world["client"].post("/feedback/segmentation/snapshot", json={},
                                headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401


def test_feedback_off_answers_404(world, monkeypatch):
    monkeypatch.setenv("MEDREFINE_FEEDBACK", "off")
    image, mask = _phantom()
    response = _post(world["client"], image, encode_mask_png(mask))
    assert response.status_code == 404 and "MEDREFINE_FEEDBACK" in response.json()["error"]
    assert world["client"].get("/feedback/segmentation", headers=_admin()).status_code == 404


def test_snapshot_is_an_ordinary_dataset_of_the_oldest_cases(world):
    client, platform = world["client"], world["platform"]
    masks = []
    for seed in (11, 12, 13):
        image, mask = _phantom(seed, size=64)
        masks.append(mask)
        assert _post(client, image, encode_mask_png(mask), dataset="snap").status_code == 201
    first = client.post("/feedback/segmentation/snapshot", json={"dataset": "snap", "limit": 2}, headers=_admin())
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["status"] == "ready" and body["cases"] == 2 and body["stats"]["pairs"] == 2
    again = client.post("/feedback/segmentation/snapshot", json={"dataset": "snap", "limit": 2}, headers=_admin())
    assert again.status_code == 200 and again.json()["id"] == body["id"]  # same cases, same dataset
    from medplatform.datasets import get_dataset

    archive = zipfile.ZipFile(io.BytesIO(platform.blobs.get_bytes(get_dataset(platform, body["id"]).blob_key)))
    cases = client.get("/feedback/segmentation", params={"dataset": "snap"}, headers=_admin()).json()
    for case, mask in zip(cases[:2], masks[:2], strict=True):
        stored = np.asarray(Image.open(io.BytesIO(archive.read(f"masks/{case['id']}.png"))))
        assert np.array_equal(stored, mask * 255)
    empty = client.post("/feedback/segmentation/snapshot", json={"dataset": "nothing-here"}, headers=_admin())
    assert empty.status_code == 404 and empty.json()["field"] == "dataset"
