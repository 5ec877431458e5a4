"""POST/GET /feedback/generation: ratings of images /generate answered, stored as what regenerates them.

Against the session's real server (generators served): a rated image's stored identity, sent back through
/generate, answers the same pixels; 4xx answers name the field (checked against the served generator's
modalities and limits). In process (Starlette test client over a platform on tmp_path): keys as the other
platform routes, MEDREFINE_FEEDBACK=off answers 404.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from medplatform import feedback
from service.platform_api import PlatformState, create_platform_app
from service.settings import ServiceSettings
from tests.support.platform_fixtures import make_platform

PROMPT = {"prompt": "chest x-ray, left lower lobe nodule", "modality": "chest_xray"}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _generate(client, body: dict) -> dict:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _identity(answer: dict, request: dict, index: int) -> dict:
    """The rated image as the UI sends it: the request, the answer's seed and version, the image's index."""
    image = {"prompt": answer["prompt"], "modality": answer["modality"], "seed": answer["seed"],
             "steps": request["steps"], "guidance_scale": request["guidance_scale"],
             "generator_version": answer["model"]["version"], "index": index}
    for key in ("negative_prompt", "num_images", "best_of", "rank_by"):
        if key in request:
            image[key] = request[key]
    return image


# --------------------------------------------------------------------------- a real server


def test_a_rated_image_regenerates_bit_identically(live_server):
    with live_server.client() as client:
        request = {**PROMPT, "negative_prompt": "noise", "steps": 6, "guidance_scale": 2.0, "num_images": 3}
        answer = _generate(client, request)  # no seed: the server draws one and answers it
        image = _identity(answer, request, 2)
        saved = client.post("/feedback/generation", json={"image": image, "rating": 4, "dataset": "regen"})
        assert saved.status_code == 201, saved.text
        listed = client.get("/feedback/generation", params={"dataset": "regen"})
        assert listed.status_code == 200
        (row,) = listed.json()
        assert row["id"] == saved.json()["id"] and row["rating"] == 4 and row["dataset"] == "regen"
        assert row["image"]["seed"] == answer["seed"] and row["image"]["prompt"] == PROMPT["prompt"]
        assert row["image"]["index"] == 2 and row["image"]["negative_prompt"] == "noise"
        assert row["other"] is None and row["preferred"] is None
        stored = feedback.GeneratedImage(**row["image"])
        assert stored.generator_version == answer["model"]["version"]
        again = _generate(client, stored.generate_body())
    assert again["model"]["version"] == stored.generator_version
    np.testing.assert_array_equal(_pixels(again["images_png_base64"][stored.index]),
                                  _pixels(answer["images_png_base64"][2]))
    # and it is that image, not any of the answer's
    assert not np.array_equal(_pixels(again["images_png_base64"][stored.index]),
                              _pixels(answer["images_png_base64"][1]))


def test_a_best_of_image_and_a_preference_regenerate(live_server):
    with live_server.client() as client:
        request = {**PROMPT, "steps": 5, "guidance_scale": 1.5, "seed": 31, "best_of": 3, "rank_by": "selector"}
        answer = _generate(client, request)
        plain = {**PROMPT, "steps": 5, "guidance_scale": 1.5, "seed": 31, "num_images": 1}
        other_answer = _generate(client, plain)
        body = {"image": _identity(answer, request, 0), "other": _identity(other_answer, plain, 0),
                "preferred": "image", "dataset": "preferences"}
        saved = client.post("/feedback/generation", json=body)
        assert saved.status_code == 201, saved.text
        (row,) = client.get("/feedback/generation", params={"dataset": "preferences"}).json()
        assert row["preferred"] == "image" and row["rating"] is None
        assert row["image"]["best_of"] == 3 and row["other"]["best_of"] is None
        assert row["image"]["rank_by"] == "selector" and row["other"]["rank_by"] is None
        for part, original in (("image", answer), ("other", other_answer)):
            stored = feedback.GeneratedImage(**row[part])
            again = _generate(client, stored.generate_body())
            np.testing.assert_array_equal(_pixels(again["images_png_base64"][stored.index]),
                                          _pixels(original["images_png_base64"][0]))


def test_list_pages_oldest_first(live_server):
    image = {**PROMPT, "seed": 5, "steps": 4, "guidance_scale": 1.5, "generator_version": "v" * 64}
    with live_server.client() as client:
        ids = [client.post("/feedback/generation", json={"image": image, "rating": r, "dataset": "paged"}).json()["id"]
               for r in (1, 2, 3)]
        first = client.get("/feedback/generation", params={"dataset": "paged", "limit": 2}).json()
        rest = client.get("/feedback/generation", params={"dataset": "paged", "limit": 2, "offset": 2}).json()
        bad = client.get("/feedback/generation", params={"limit": "many"})
    assert [r["id"] for r in first + rest] == ids and [r["rating"] for r in first + rest] == [1, 2, 3]
    assert bad.status_code == 400 and bad.json()["field"] == "limit"


GOOD = {**PROMPT, "seed": 5, "steps": 4, "guidance_scale": 1.5, "generator_version": "v" * 64}


@pytest.mark.parametrize(("body", "field"), [
    ({"image": GOOD, "rating": 6}, "rating"),
    ({"image": GOOD, "rating": 0}, "rating"),
    ({"image": GOOD, "rating": "4"}, "rating"),
    ({"image": GOOD}, "rating"),  # neither a rating nor a preference
    ({"image": GOOD, "rating": 3, "other": {**GOOD, "seed": 6}, "preferred": "other"}, "rating"),  # both
    ({"image": GOOD, "other": {**GOOD, "seed": 6}}, "preferred"),
    ({"image": GOOD, "other": {**GOOD, "seed": 6}, "preferred": "left"}, "preferred"),
    ({"image": GOOD, "preferred": "image"}, "other"),
    ({"image": GOOD, "other": {**GOOD, "prompt": "brain mri"}, "preferred": "image"}, "other"),
    ({"image": {**GOOD, "modality": "pet"}, "rating": 3}, "image.modality"),  # not a served modality
    ({"image": {**GOOD, "seed": -1}, "rating": 3}, "image.seed"),
    ({"image": {**GOOD, "steps": 0}, "rating": 3}, "image.steps"),
    ({"image": {**GOOD, "steps": 101}, "rating": 3}, "image.steps"),  # the server's limit (the pipeline's: 200)
    ({"image": {**GOOD, "guidance_scale": 31}, "rating": 3}, "image.guidance_scale"),
    ({"image": {**GOOD, "index": 1}, "rating": 3}, "image.index"),
    ({"image": {**GOOD, "num_images": 17, "index": 0}, "rating": 3}, "image.num_images"),
    ({"image": {**GOOD, "generator_version": ""}, "rating": 3}, "image.generator_version"),
    ({"image": {k: v for k, v in GOOD.items() if k != "prompt"}, "rating": 3}, "image.prompt"),
    ({"image": {**GOOD, "pixels": "..."}, "rating": 3}, "image.pixels"),
    ({"image": GOOD, "rating": 3, "score": 3}, "score"),
    ({"image": "a picture", "rating": 3}, "image"),
    ({"image": GOOD, "rating": 3, "dataset": 12}, "dataset"),
])
def test_bad_values_are_400_naming_the_field(live_server, body, field):
    with live_server.client() as client:
        response = client.post("/feedback/generation", json={**body, "dataset": body.get("dataset", "bad-values")})
        assert response.status_code == 400, response.text
        assert response.json()["field"] == field
        assert client.get("/feedback/generation", params={"dataset": "bad-values"}).json() == []


def test_not_json_is_refused(live_server):
    with live_server.client() as client:
        form = client.post("/feedback/generation", data={"rating": "4"})
        broken = client.post("/feedback/generation", content=b"{rating: 4",
                             headers={"content-type": "application/json"})
        array = client.post("/feedback/generation", json=[GOOD, 4])
    assert form.status_code == 415
    assert broken.status_code == 400 and array.status_code == 400


# --------------------------------------------------------------------------- in process: keys and the off switch

API_KEY, ADMIN_KEY = "api-key-0123456789", "admin-key-0123456789"


@pytest.fixture
def client(tmp_path, monkeypatch):
    platform = make_platform(tmp_path, monkeypatch)
    settings = ServiceSettings(api_key=API_KEY, admin_key=ADMIN_KEY)
    return TestClient(create_platform_app(PlatformState(platform=platform), settings=lambda: settings))


def test_saving_takes_the_admin_key_and_reading_the_api_key(client):
    body = {"image": GOOD, "rating": 5}
    assert client.post("/feedback/generation", json=body).status_code == 401
    assert client.post("/feedback/generation", json=body, headers={"X-API-Key": API_KEY}).status_code == 401
    saved = client.post("/feedback/generation", json=body, headers={"X-API-Key": ADMIN_KEY})
    assert saved.status_code == 201 and saved.json()["dataset"] == feedback.GENERATION_DATASET
    assert client.get("/feedback/generation").status_code == 401
    listed = client.get("/feedback/generation", headers={"X-API-Key": API_KEY}).json()
    assert [r["rating"] for r in listed] == [5] and listed[0]["image"]["modality"] == "chest_xray"


def test_off_switch_answers_404_and_stores_nothing(client, monkeypatch):
    monkeypatch.setenv("MEDREFINE_FEEDBACK", "off")
    saved = client.post("/feedback/generation", json={"image": GOOD, "rating": 5}, headers={"X-API-Key": ADMIN_KEY})
    assert saved.status_code == 404 and "MEDREFINE_FEEDBACK" in saved.json()["error"]
    assert client.get("/feedback/generation", headers={"X-API-Key": API_KEY}).status_code == 404
    monkeypatch.setenv("MEDREFINE_FEEDBACK", "on")
    assert client.get("/feedback/generation", headers={"X-API-Key": API_KEY}).json() == []
