"""The platform pages (/ui/platform.html) and the segment page's model picker in headless Chromium against a real
server with an admin key and one job worker: drop a ZIP -> ready with 8 pairs, train -> live progress ->
succeeded, the new version's Dice, Promote, and /segment with the picked version.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (``make browser``), as tests/ui/test_ui.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.support.platform_fixtures import folder_members, phantom_folder, zip_bytes
from tests.support.service_fixtures import TEST_API_KEY, ServerProcess, start_server

pytest.importorskip("selenium.webdriver")  # without Chromium, the `browser` fixture skips (tests/conftest.py)

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ADMIN_KEY = "admin-key-0123456789"
MODEL = "phantom-ui"
JOB_TIMEOUT_S = 300.0  # a tiny 1-epoch three-phase train + evaluate + ONNX export on two busy cores
# test_log_hygiene.EXTERNAL_URL: a URL naming a host other than loopback
EXTERNAL_URL = re.compile(r"""(?:https?:)?//(?!(?:127\.0\.0\.1|localhost|\[::1\])[:/"'])[A-Za-z0-9.-]+\.[A-Za-z]""")


@pytest.fixture(scope="module")
def server(service_artifacts, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ui_platform")
    env = {"MEDREFINE_DATA_DIR": str(root / "data"), "MEDREFINE_ADMIN_KEY": ADMIN_KEY,
           "MEDREFINE_CACHE_DIR": str(root / "cache"), "MEDREFINE_PLATFORM_WORKERS": "1",
           "MEDREFINE_JOB_HEARTBEAT_S": "1", "MEDREFINE_JOB_POLL_S": "0.2", "MEDREFINE_JOB_DEVICE": "cpu"}
    process = start_server(service_artifacts.art_dir, root / "server", env=env)
    yield process
    process.stop()




@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """8 ultrasound phantoms of 64 px (core.phantoms): relative path -> bytes (images/ + masks/)."""
    return folder_members(phantom_folder(tmp_path_factory.mktemp("phantoms") / "us", n=8, size=64, seed=5))


def _drop(driver, zone_id: str, path: Path) -> None:
    """Drop ``path`` on the element ``zone_id`` as a user dragging it from the desktop would: a DataTransfer
    holding the file (read through a throw-away file input, the only way a test can hand Chromium a file)."""
    staging = driver.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-staging';"
        "document.body.append(i); return i;")
    staging.send_keys(str(path))
    driver.execute_script(
        "const [input, zone] = [arguments[0], document.getElementById(arguments[1])];"
        "const data = new DataTransfer(); data.items.add(input.files[0]); input.remove();"
        "for (const type of ['dragenter', 'dragover', 'drop'])"
        "  zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));",
        staging, zone_id)


def _body(driver, name: str) -> str | None:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-" + name)


# The tables re-render on every refresh: an element found a moment ago may be gone; look it up again.
RERENDERED = (NoSuchElementException, StaleElementReferenceException)


def _wait_upload(driver, wanted: str, timeout: float = 60.0) -> None:
    def done(d):
        state = _body(d, "upload")
        if state not in (None, "busy", wanted):
            raise AssertionError(f"upload {state}: " + d.find_element(By.ID, "upload-verdict").text)
        return state == wanted

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(done)


def _shot(driver, path: Path) -> None:
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def test_platform_files_name_no_other_host(server: ServerProcess):
    for name in ("platform.html", "platform.js", "platform.css", "index.html", "app.js"):
        answer = httpx.get(f"{server.url}/ui/{name}", timeout=30)
        assert answer.status_code == 200, name
        assert EXTERNAL_URL.findall(answer.text) == [], name


def test_dataset_to_promoted_version_to_segment(browser, server: ServerProcess, phantoms, tmp_path: Path):
    good, bad = tmp_path / "phantoms.zip", tmp_path / "broken.zip"
    good.write_bytes(zip_bytes(phantoms))
    bad.write_bytes(zip_bytes({k: v for k, v in phantoms.items() if k != "masks/0003.png"}))
    reader = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=60)

    # 1. Keys typed once (kept in sessionStorage, never in the URL); drop the ZIP: ready, 8 pairs, thumbnails.
    browser.get(server.url + "/ui/platform.html#datasets")
    browser.find_element(By.ID, "apikey").send_keys(TEST_API_KEY)
    browser.find_element(By.ID, "adminkey").send_keys(ADMIN_KEY, Keys.TAB)
    WebDriverWait(browser, 30).until(lambda d: _body(d, "loaded") == "yes")
    assert ADMIN_KEY not in browser.current_url and TEST_API_KEY not in browser.current_url
    _drop(browser, "dropzone", good)
    _wait_upload(browser, "ready")
    assert "8 image/mask pairs" in browser.find_element(By.ID, "upload-verdict").text
    (dataset,) = reader.get("/datasets").json()
    script = ("const row = document.querySelector(`#dataset-table tr[data-id='${arguments[0]}']`);"
              "if (!row) return null; const imgs = [...row.querySelectorAll('img.thumb')];"
              "return imgs.length && imgs.every(i => i.complete) ? [row.dataset.status,"
              " row.querySelector('.pairs').textContent, imgs.map(i => i.naturalWidth)] : null;")
    shown = WebDriverWait(browser, 30).until(lambda d: d.execute_script(script, dataset["id"]))
    assert shown == ["ready", "8", [64] * 4]  # status, pairs, four thumbnails at the size asked

    # 2. A ZIP with a mask missing: the verdict is "error" and names the image without its mask.
    _drop(browser, "dropzone", bad)
    _wait_upload(browser, "error")
    verdict = browser.find_element(By.ID, "upload-verdict").text
    assert "images/0003.png" in verdict and "no mask" in verdict
    _shot(browser, tmp_path / "datasets.png")

    # 3. Train from the Jobs page: the row follows the event stream (phases, epochs) until it succeeded.
    browser.find_element(By.CSS_SELECTOR, "nav a[data-tab=jobs]").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "job-form").is_displayed())
    assert Select(browser.find_element(By.ID, "job-dataset")).first_selected_option.get_attribute(
        "value") == dataset["id"]  # only ready datasets are offered
    for field, value in (("job-recipe", MODEL), ("job-epochs", "1")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    Select(browser.find_element(By.ID, "job-preset")).select_by_value("tiny")
    browser.find_element(By.ID, "job-submit").click()
    job_row = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#job-table tbody tr"))
    job_id = job_row.get_attribute("data-id")
    seen: list[tuple[str, ...]] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        view = tuple(browser.execute_script(  # in one go: the stream's next event rebuilds the row's cells
            "const row = document.querySelector(`#job-table tr[data-id='${arguments[0]}']`);"
            "return [row.dataset.status, ...['phase', 'epoch', 'loss', 'val-dice']"
            "  .map((name) => row.querySelector('.' + name).textContent)];", job_id))
        status = view[0]
        if not seen or seen[-1] != view:
            seen.append(view)
            if status == "running" and view[3] != "—" and not (tmp_path / "jobs-running.png").exists():
                _shot(browser, tmp_path / "jobs-running.png")
        if status in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {status} after {JOB_TIMEOUT_S:.0f} s: {seen}"
        time.sleep(0.2)
    print("job rows seen:", seen)
    assert status == "succeeded", (seen, reader.get(f"/jobs/{job_id}/logs").text[-3000:])
    phases = {view[1].split(" ")[0] for view in seen if view[0] == "running" and view[1] != "—"}
    assert len(phases) >= 2, seen  # the row moved through the run's phases as the stream reported them
    numbers = re.compile(r"\d+\.\d+")
    assert any(view[0] == "running" and view[2] == "1/1" and numbers.fullmatch(view[3]) and
               numbers.fullmatch(view[4]) for view in seen), seen  # epoch, loss and val Dice while it ran
    job_row = browser.find_element(By.CSS_SELECTOR, f"#job-table tr[data-id='{job_id}']")
    assert int(job_row.get_attribute("data-events")) >= 3  # queued/running, progress..., succeeded
    assert f"{MODEL}:1" in job_row.find_element(By.CLASS_NAME, "result").text
    _shot(browser, tmp_path / "jobs.png")

    # A second, long job: Cancel in its row stops it (queued: at once; running: at its next report).
    browser.find_element(By.ID, "job-epochs").clear()
    browser.find_element(By.ID, "job-epochs").send_keys("200")
    browser.find_element(By.ID, "job-submit").click()
    long_row = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#job-table tbody tr:not([data-id='{job_id}'])"))
    long_id = long_row.get_attribute("data-id")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(
        By.CSS_SELECTOR, f"#job-table tr[data-id='{long_id}'] button.cancel")).click()
    WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=RERENDERED).until(lambda d: d.find_element(
        By.CSS_SELECTOR, f"#job-table tr[data-id='{long_id}']").get_attribute("data-status") == "cancelled")
    assert reader.get(f"/jobs/{long_id}").json()["status"] == "cancelled"

    # 4. Models: the new version with its held-out Dice; Promote moves `production` to it.
    (version,) = reader.get(f"/models/{MODEL}/versions").json()
    browser.find_element(By.CSS_SELECTOR, "nav a[data-tab=models]").click()
    version_row = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f".model[data-name='{MODEL}'] tr[data-version='1']"))
    assert version_row.find_element(By.CSS_SELECTOR, ".metric.dice").text == f"{version['metrics']['dice']:.3f}"
    assert version_row.find_element(By.CLASS_NAME, "aliases").text == ""
    browser.find_element(By.CSS_SELECTOR, ".model[data-name='default'] tr[data-version='1']")  # the start-up model
    version_row.find_element(By.CLASS_NAME, "promote").click()
    WebDriverWait(browser, 30, ignored_exceptions=RERENDERED).until(lambda d: d.find_element(
        By.CSS_SELECTOR, f".model[data-name='{MODEL}'] tr[data-version='1'] .aliases").text == "production")
    assert {m["name"]: m["aliases"] for m in reader.get("/models").json()}[MODEL] == {"production": 1}
    _shot(browser, tmp_path / "models.png")

    # 5. The segment page: the picker lists the version with its alias; /segment with it answers that version.
    browser.get(server.url + "/ui/")
    picker = browser.find_element(By.ID, "model-pick")
    WebDriverWait(browser, 30).until(lambda d: picker.get_attribute("data-loaded"))
    labels = {o.get_attribute("value"): o.text for o in Select(picker).options}
    assert labels[f"{MODEL}:1"] == f"{MODEL}:1 (production)" and labels["default:1"] == "default:1 (production)"
    for image, choice in (("images/0000.png", ""), ("images/0001.png", f"{MODEL}:1")):
        Select(picker).select_by_value(choice)
        upload = tmp_path / image.replace("/", "-")
        upload.write_bytes(phantoms[image])
        browser.execute_script("document.body.dataset.state = 'idle';")
        browser.find_element(By.ID, "file").send_keys(str(upload))
        WebDriverWait(browser, 120, poll_frequency=0.1).until(
            lambda d: _body(d, "state") in ("segmented", "error"))
        status = browser.find_element(By.ID, "status").text
        assert _body(browser, "state") == "segmented", status
        table = browser.find_element(By.ID, "result-table").text
        assert f"model {choice or 'default:1'} / onnxruntime" in table, table
    # /refine (drag a box) goes to the picked version too.
    overlay = browser.find_element(By.ID, "overlay-layer")
    width = overlay.size["width"]
    ActionChains(browser).move_to_element_with_offset(overlay, -width // 4, -width // 4).click_and_hold() \
        .move_by_offset(width // 2, width // 2).release().perform()
    WebDriverWait(browser, 120, poll_frequency=0.1).until(lambda d: _body(d, "state") in ("refined", "error"))
    assert _body(browser, "state") == "refined", browser.find_element(By.ID, "status").text
    assert f"model {MODEL}:1 / onnxruntime" in browser.find_element(By.ID, "result-table").text
    _shot(browser, tmp_path / "segment.png")
    reader.close()
