"""The correction panel of /ui in headless Chromium against a real server with an admin key: segment a phantom,
click a lesion point (/refine), paint and erase pixels with the brush, save; the mask stored on the platform
(read back through GET /feedback/segmentation/{id}/mask) equals the canvas pixel for pixel. "Accept as is"
stores the automatic mask with no prompts.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (``make browser``), as tests/ui/test_ui.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from core.imageio import encode_png
from core.phantoms import breast_ultrasound
from tests.support.service_fixtures import start_server

pytest.importorskip("selenium.webdriver")  # without Chromium, the `browser` fixture skips (tests/conftest.py)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ADMIN_KEY = "admin-key-0123456789"
SIZE = 160
MASK_PIXELS = ("const c = document.getElementById('mask-layer');"
               "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
               "const out = []; for (let i = 0; i < d.length; i += 4) out.push(d[i]); return [c.width, c.height, out];")


@pytest.fixture(scope="module")
def server(service_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_feedback")
    env = {"MEDREFINE_ADMIN_KEY": ADMIN_KEY, "MEDREFINE_CACHE_DIR": str(root / "cache"),
           "MEDREFINE_PLATFORM_WORKERS": "0"}
    process = start_server(service_artifacts.art_dir, root / "server", env=env)
    yield process
    process.stop()


def _wait(driver, attribute: str, wanted: str, status_id: str, timeout: float = 60.0) -> None:
    def done(d):
        value = d.find_element(By.TAG_NAME, "body").get_attribute(attribute)
        if value == "error":
            raise AssertionError("UI error: " + d.find_element(By.ID, status_id).text)
        return value == wanted

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(done)


def _at(driver, x: float, y: float) -> tuple[int, int]:
    """Offset from the overlay's centre (Selenium 4's origin) of image pixel (x, y)."""
    overlay = driver.find_element(By.ID, "overlay-layer")
    width, height = overlay.size["width"], overlay.size["height"]
    return round((x + 0.5) * width / SIZE - width / 2), round((y + 0.5) * height / SIZE - height / 2)


def _tool(driver, value: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"input[name=fb-tool][value='{value}']").click()


def _stroke(driver, start: tuple[float, float], end: tuple[float, float]) -> None:
    overlay = driver.find_element(By.ID, "overlay-layer")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", overlay)
    x0, y0 = _at(driver, *start)
    x1, y1 = _at(driver, *end)
    chain = ActionChains(driver).move_to_element_with_offset(overlay, x0, y0).click_and_hold()
    for step in range(1, 17):  # small moves: the brush paints a disc at every mousemove
        chain = chain.move_to_element_with_offset(overlay, x0 + (x1 - x0) * step // 16, y0 + (y1 - y0) * step // 16)
    chain.release().perform()


def _stored_mask(server, case_id: str) -> np.ndarray:
    response = httpx.get(f"{server.url}/feedback/segmentation/{case_id}/mask",
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def _save(driver, button: str) -> str:
    driver.execute_script("document.body.dataset.feedback = 'ready';")
    driver.find_element(By.ID, button).click()
    _wait(driver, "data-feedback", "saved", "fb-status")
    return driver.find_element(By.ID, "feedback-panel").get_attribute("data-saved")


def _segment(driver, server, upload: Path) -> None:
    driver.set_window_size(1400, 1600)  # the whole image on screen: every stroke's target is in view
    driver.get(server.url + "/ui/")
    WebDriverWait(driver, 30).until(lambda d: "model " in d.find_element(By.ID, "model").text)
    key = driver.find_element(By.ID, "apikey")
    key.clear()
    key.send_keys(server.api_key)
    driver.find_element(By.ID, "file").send_keys(str(upload))
    _wait(driver, "data-state", "segmented", "status")
    assert driver.find_element(By.ID, "feedback-panel").is_displayed()  # shown once there is a mask
    admin = driver.find_element(By.ID, "fb-adminkey")
    admin.clear()
    admin.send_keys(ADMIN_KEY)


def test_corrected_mask_is_stored_pixel_for_pixel(browser, server, tmp_path):
    image, truth = breast_ultrasound(7, size=SIZE)
    upload = tmp_path / "phantom.png"
    upload.write_bytes(encode_png(image))
    _segment(browser, server, upload)
    automatic = np.array(browser.execute_script(MASK_PIXELS)[2], np.uint8).reshape(SIZE, SIZE)

    # one lesion click through /refine (a prompt), then the brush and the eraser for the last pixels
    ys, xs = np.nonzero(truth)
    _tool(browser, "point+")
    overlay = browser.find_element(By.ID, "overlay-layer")
    ActionChains(browser).move_to_element_with_offset(overlay, *_at(browser, xs.mean(), ys.mean())).click().perform()
    _wait(browser, "data-state", "refined", "status")
    radius = browser.find_element(By.ID, "fb-brush")
    radius.clear()
    radius.send_keys("5")
    _tool(browser, "brush")
    _stroke(browser, (12, 12), (40, 12))  # a corner far from the lesion: background everywhere
    _tool(browser, "eraser")
    row = int(ys.mean())
    _stroke(browser, (xs.min() - 6, row), (xs.max() + 6, row))  # a cut through the lesion
    width, height, pixels = browser.execute_script(MASK_PIXELS)
    canvas = np.array(pixels, np.uint8).reshape(height, width)
    assert (width, height) == (SIZE, SIZE) and set(np.unique(canvas)) <= {0, 255}
    assert canvas[12, 12:41].min() == 255 and automatic[12, 12:41].max() == 0  # painted where the model said no
    assert canvas[row, xs.min():xs.max() + 1].max() == 0  # erased across the lesion

    case_id = _save(browser, "fb-save")
    assert np.array_equal(_stored_mask(server, case_id), canvas)
    case = httpx.get(f"{server.url}/feedback/segmentation/{case_id}",
                     headers={"Authorization": f"Bearer {server.api_key}"}).json()
    assert case["prompts"] == 1 and case["model_version"] == "default:1" and case["dataset"] == "feedback"
    assert case["seconds"] > 0 and case["details"]["mask_pixels"] == int((canvas == 255).sum())

    # "Accept as is": the automatic mask, no prompts
    accepted = _save(browser, "fb-accept")
    assert np.array_equal(_stored_mask(server, accepted), automatic)
    assert httpx.get(f"{server.url}/feedback/segmentation/{accepted}",
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["prompts"] == 0
