"""The /ui page in headless Chromium against the live server: upload -> overlay, drag a box -> refine.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and
the ``selenium`` package. Saves a screenshot into tmp_path (``make screenshots``: to ``docs/ui.png``).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from core.imageio import encode_png
from core.phantoms import breast_ultrasound

pytest.importorskip("selenium.webdriver")  # without Chromium, the `browser` fixture skips (tests/conftest.py)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]




def _state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _wait_state(driver, wanted: str, timeout: float = 60.0) -> None:
    def done(d):
        state = _state(d)
        if state == "error":
            raise AssertionError("UI error: " + d.find_element(By.ID, "status").text)
        return state == wanted

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(done)


def _painted(driver) -> int:
    return int(driver.find_element(By.ID, "overlay-layer").get_attribute("data-painted") or 0)


def test_static_files_are_served(live_server):
    for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")):
        response = httpx.get(live_server.url + path)
        assert response.status_code == 200 and kind in response.headers["content-type"], path
    assert 'id="overlay-layer"' in httpx.get(live_server.url + "/ui/").text
    redirect = httpx.get(live_server.url + "/ui")
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"


def test_upload_shows_overlay_and_box_refines(browser, live_server, tmp_path):
    image, _ = breast_ultrasound(7, size=160)
    upload = tmp_path / "phantom.png"
    upload.write_bytes(encode_png(image))
    manifest_version = httpx.get(live_server.url + "/readyz").json()["model_version"]

    browser.get(live_server.url + "/ui/")
    WebDriverWait(browser, 30).until(lambda d: "model " in d.find_element(By.ID, "model").text)
    assert manifest_version[:12] in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "apikey").send_keys(live_server.api_key)
    browser.find_element(By.ID, "file").send_keys(str(upload))
    _wait_state(browser, "segmented")

    # The uploaded image is drawn at its own size, the overlay holds contours, the table the result.
    size = browser.execute_script(
        "const c = document.getElementById('image-layer');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let lit = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 0) lit++;"
        "return [c.width, c.height, lit];")
    assert size[:2] == [160, 160] and size[2] > 1000
    contours = _painted(browser)
    assert contours > 0
    browser.find_element(By.ID, "show-gate").click()
    assert _painted(browser) == 160 * 160  # the gate heat map covers every pixel
    browser.find_element(By.ID, "show-gate").click()
    assert _painted(browser) == contours
    table = browser.find_element(By.ID, "result-table").text
    assert "area (px)" in table and "time transunet (ms)" in table
    assert "needs review" in table and "lesion found" in table and "predicted IoU" in table
    # The legend states what the gate map is: its range, or that it is one constant (no uncertainty shown).
    legend = browser.find_element(By.ID, "gate-legend").text
    assert legend.startswith("gate") and legend != "gate (low → high)"
    flat = browser.execute_script("return state.gateFlat")
    assert ("constant" in legend) == flat and (("none: constant gate" in table) == flat)
    # Into tmp_path: a test run leaves the tree as it found it. `make screenshots` refreshes docs/ui.png.
    shot = Path(os.environ.get("MEDREFINE_SCREENSHOT_OUT") or tmp_path / "ui.png")
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # Drag a box on the overlay: /refine runs and draws its contour; the second drag hits the cache.
    overlay = browser.find_element(By.ID, "overlay-layer")
    width = overlay.size["width"]
    for expected in ("miss", "hit"):
        ActionChains(browser).move_to_element_with_offset(overlay, -width // 4, -width // 4).click_and_hold() \
            .move_by_offset(width // 2, width // 2).release().perform()
        _wait_state(browser, "refined")
        assert f"embedding cache {expected}" in browser.find_element(By.ID, "status").text
        browser.execute_script("document.body.dataset.state = 'segmented';")
    assert _painted(browser) >= contours


def test_ui_shows_server_errors(browser, live_server, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image at all")
    browser.get(live_server.url + "/ui/")
    key = browser.find_element(By.ID, "apikey")
    assert key.get_attribute("value") == live_server.api_key  # remembered for the browser session
    key.clear()
    key.send_keys(live_server.api_key)
    browser.find_element(By.ID, "file").send_keys(str(bogus))
    WebDriverWait(browser, 30).until(lambda d: _state(d) == "error")
    assert browser.find_element(By.ID, "status").text.startswith("415:")


def test_generate_panel_shows_the_generated_images(browser, live_server):
    from selenium.webdriver.support.ui import Select

    browser.get(live_server.url + "/ui/")
    panel = browser.find_element(By.ID, "generate-panel")
    WebDriverWait(browser, 30).until(lambda d: panel.is_displayed())
    modalities = [o.text for o in Select(browser.find_element(By.ID, "gen-modality")).options]
    assert "chest_xray" in modalities and "brain_mri" in modalities
    key = browser.find_element(By.ID, "apikey")
    key.clear()
    key.send_keys(live_server.api_key)
    browser.find_element(By.ID, "gen-prompt").send_keys("brain mri, glioma")
    Select(browser.find_element(By.ID, "gen-modality")).select_by_visible_text("brain_mri")
    steps = browser.find_element(By.ID, "gen-steps")
    steps.clear()
    steps.send_keys("5")
    browser.find_element(By.ID, "gen-run").click()

    def finished(d):
        state = d.find_element(By.TAG_NAME, "body").get_attribute("data-generate")
        if state == "error":
            raise AssertionError("UI error: " + d.find_element(By.ID, "gen-status").text)
        return state == "done"

    WebDriverWait(browser, 60, poll_frequency=0.1).until(finished)
    script = ("const imgs = [...document.querySelectorAll('#gen-gallery img')];"
              "return imgs.every(i => i.complete) ? imgs.map(i => [i.naturalWidth, i.naturalHeight]) : null;")
    sizes = WebDriverWait(browser, 10).until(lambda d: d.execute_script(script))
    assert sizes == [[128, 128]] * 4  # four images (the panel's default) at the generator's size
    assert "seed" in browser.find_element(By.ID, "gen-status").text
