"""Rating generated images in /ui (headless Chromium, a real server with generators and an admin key): generate,
rate an image 1-5, and the rating is stored (GET /feedback/generation) with the seed, prompt and index that
regenerate that image's pixels through /generate; without the admin key the panel shows the 401 and stores nothing.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (``make browser``), as tests/ui/test_ui.py.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from medplatform.feedback import GeneratedImage
from tests.support.service_fixtures import start_server

pytest.importorskip("selenium.webdriver")  # without Chromium, the `browser` fixture skips (tests/conftest.py)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ADMIN_KEY = "admin-key-0123456789"
PROMPT = "brain mri, glioma"


@pytest.fixture(scope="module")
def server(service_artifacts, reward_generator_artifacts, tmp_path_factory):
    """Generators exported after RLHF (with a reward model), so the panel offers keeping the reward's best."""
    root = tmp_path_factory.mktemp("ui_ratings")
    env = {"MEDREFINE_ADMIN_KEY": ADMIN_KEY, "MEDREFINE_GENERATORS": str(reward_generator_artifacts),
           "MEDREFINE_PLATFORM_WORKERS": "0"}
    process = start_server(service_artifacts.art_dir, root / "server", env=env)
    yield process
    process.stop()


def _wait(driver, attribute: str, wanted: str, status: str) -> None:
    def done(d):
        value = d.find_element(By.TAG_NAME, "body").get_attribute(attribute)
        if value == "error" and wanted != "error":
            raise AssertionError("UI error: " + d.find_element(By.CSS_SELECTOR, status).text)
        return value == wanted

    WebDriverWait(driver, 90, poll_frequency=0.1).until(done)


def _type(driver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _ratings(server, dataset: str = "ui-ratings") -> list[dict]:
    response = httpx.get(f"{server.url}/feedback/generation", params={"dataset": dataset},
                         headers=server.headers())
    assert response.status_code == 200, response.text
    return response.json()


def test_a_rating_is_stored_with_what_regenerates_the_image(browser, server):
    browser.get(server.url + "/ui/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "generate-panel").is_displayed())
    _type(browser, "apikey", server.api_key)
    _type(browser, "gen-prompt", PROMPT)
    Select(browser.find_element(By.ID, "gen-modality")).select_by_visible_text("brain_mri")
    for element_id, value in (("gen-steps", "4"), ("gen-count", "2"), ("gen-seed", "17"), ("gen-guidance", "2"),
                              ("gen-rating-dataset", "ui-ratings")):
        _type(browser, element_id, value)
    browser.find_element(By.ID, "gen-run").click()
    _wait(browser, "data-generate", "done", "#gen-status")
    figures = browser.find_elements(By.CSS_SELECTOR, "#gen-gallery figure")
    assert len(figures) == 2

    # without the admin key: the 401 is shown under the image, nothing stored
    _type(browser, "gen-adminkey", "")
    figures[0].find_element(By.CSS_SELECTOR, "button[data-rating='2']").click()
    _wait(browser, "data-rating", "error", "#gen-gallery .rating-note")
    assert figures[0].find_element(By.CSS_SELECTOR, ".rating-note").text.startswith("401:")
    assert _ratings(server) == []

    _type(browser, "gen-adminkey", ADMIN_KEY)
    control = figures[1].find_element(By.CSS_SELECTOR, ".rating")
    control.find_element(By.CSS_SELECTOR, "button[data-rating='4']").click()
    _wait(browser, "data-rating", "saved", "#gen-gallery .rating-note")
    pressed = [b.get_attribute("aria-pressed") for b in control.find_elements(By.TAG_NAME, "button")]
    assert pressed == ["false", "false", "false", "true", "false"]
    assert control.find_element(By.CSS_SELECTOR, ".rating-note").text == "saved: 4/5"

    (row,) = _ratings(server)
    assert row["id"] == control.get_attribute("data-saved") and row["rating"] == 4
    image = row["image"]
    assert (image["prompt"], image["modality"], image["seed"], image["index"]) == (PROMPT, "brain_mri", 17, 1)
    assert (image["steps"], image["guidance_scale"], image["num_images"]) == (4, 2.0, 2)
    version = httpx.get(f"{server.url}/readyz").json()["generation"]["version"]
    assert image["generator_version"] == version

    # the stored identity regenerates the pixels the page showed
    shown = figures[1].find_element(By.TAG_NAME, "img").get_attribute("src").split(",", 1)[1]
    body = {k: image[k] for k in ("prompt", "modality", "seed", "steps", "guidance_scale", "num_images")}
    again = httpx.post(f"{server.url}/generate", json=body, headers=server.headers(), timeout=120)
    assert again.status_code == 200, again.text
    np.testing.assert_array_equal(_pixels(again.json()["images_png_base64"][image["index"]]), _pixels(shown))


def test_keeping_the_reward_models_best_shows_and_rates_that_image(browser, server):
    browser.get(server.url + "/ui/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "generate-panel").is_displayed())
    keep = Select(browser.find_element(By.ID, "gen-keep"))
    assert [o.get_attribute("value") for o in keep.options] == ["", "selector", "reward"]
    _type(browser, "apikey", server.api_key)
    _type(browser, "gen-adminkey", ADMIN_KEY)
    _type(browser, "gen-prompt", PROMPT)
    Select(browser.find_element(By.ID, "gen-modality")).select_by_visible_text("brain_mri")
    for element_id, value in (("gen-steps", "4"), ("gen-count", "3"), ("gen-seed", "23"),
                              ("gen-rating-dataset", "ui-best-of")):
        _type(browser, element_id, value)
    keep.select_by_value("reward")
    browser.find_element(By.ID, "gen-run").click()
    _wait(browser, "data-generate", "done", "#gen-status")
    (figure,) = browser.find_elements(By.CSS_SELECTOR, "#gen-gallery figure")
    assert browser.find_element(By.ID, "gen-status").text.startswith("the best of 3 by the reward model")

    # the image shown is the best of the three candidates by the reward model, as /generate answers it
    shown = _pixels(figure.find_element(By.TAG_NAME, "img").get_attribute("src").split(",", 1)[1])
    request = {"prompt": PROMPT, "modality": "brain_mri", "steps": 4, "seed": 23, "guidance_scale": 1.5}
    best = httpx.post(f"{server.url}/generate", json=request | {"best_of": 3, "rank_by": "reward"},
                      headers=server.headers(), timeout=120).json()
    np.testing.assert_array_equal(_pixels(best["images_png_base64"][0]), shown)
    candidates = httpx.post(f"{server.url}/generate", json=request | {"num_images": 3}, headers=server.headers(),
                            timeout=120).json()["images_png_base64"]
    assert any(np.abs(_pixels(c).astype(int) - shown.astype(int)).max() <= 1 for c in candidates)

    # rated, it is stored as a reward-ranked best-of that regenerates those pixels
    figure.find_element(By.CSS_SELECTOR, "button[data-rating='5']").click()
    _wait(browser, "data-rating", "saved", "#gen-gallery .rating-note")
    (row,) = _ratings(server, "ui-best-of")
    image = row["image"]
    assert (image["best_of"], image["rank_by"], image["num_images"], image["index"]) == (3, "reward", 1, 0)
    again = httpx.post(f"{server.url}/generate", json=GeneratedImage(**image).generate_body(),
                       headers=server.headers(), timeout=120)
    np.testing.assert_array_equal(_pixels(again.json()["images_png_base64"][0]), shown)
