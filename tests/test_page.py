"""The page at / in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium):
upload an image, crop it, read the result from the page. Skipped where that browser is absent, except
in CI (`CI` set), which installs it: there a missing browser, driver or selenium fails the run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from needs import missing, need_module

CHROMIUM = os.environ.get("CROPPER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CROPPER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")

if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
    missing(f"{CHROMIUM} / {CHROMEDRIVER} not installed (apt-get install -y chromium chromium-driver)",
            module_level=True)
webdriver = need_module("selenium.webdriver", "selenium (the dev extra)", module_level=True)
need_module("uvicorn", "uvicorn (the server extra)", module_level=True)

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from cropper_engine.config import load_config
    from cropper_engine.server import create_app

    cfg = load_config(env={}, overrides={"vlm.model": "none", "retrieval.embedder": "classical"})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium manager: never download a browser or driver
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-extensions", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(log)), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_state(driver, states=("done", "error"), timeout=60.0) -> str:
    from selenium.webdriver.common.by import By

    t = time.monotonic()
    while time.monotonic() - t < timeout:
        state = driver.find_element(By.ID, "status").get_attribute("data-state")
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"the page did not finish: {driver.find_element(By.ID, 'status').text}")


def test_page_crops_an_uploaded_image(server, browser, photos, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    img = tmp_path / "cat photo.jpg"  # a name with a space, as people's files have
    shutil.copy(photos[1], img)
    browser.get(server + "/")
    assert browser.title == "cropper-engine"
    assert browser.find_element(By.ID, "go").get_attribute("disabled") is not None
    browser.find_element(By.ID, "image").send_keys(str(img))
    Select(browser.find_element(By.ID, "task")).select_by_value("ratio")
    ratio = browser.find_element(By.ID, "ratio")
    ratio.clear()
    ratio.send_keys("16:9")
    browser.find_element(By.ID, "go").click()
    assert wait_state(browser) == "done", browser.find_element(By.ID, "status").text

    box = [int(v) for v in browser.find_element(By.ID, "result").get_attribute("data-box").split(",")]
    # the page shows what the API answers for the same upload
    api = httpx.post(server + "/v1/crop", files={"image": ("x.jpg", img.read_bytes())},
                     data={"task": "ratio", "ratio": "16:9"}).json()
    assert box == api["box"]
    x1, y1, x2, y2 = box
    assert abs((x2 - x1) / (y2 - y1) - 16 / 9) < 0.02
    chosen = browser.find_element(By.ID, "chosen")
    assert chosen.get_attribute("data-box") == ",".join(map(str, box))
    assert [float(chosen.get_attribute(k)) for k in ("x", "y", "width", "height")] == [x1, y1, x2 - x1, y2 - y1]
    cands = browser.find_elements(By.CSS_SELECTOR, "#overlay rect.cand")
    assert len(cands) == len(api["candidates"]) > 1
    rows = browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")
    assert len(rows) == len(cands) and browser.find_elements(By.CSS_SELECTOR, "#candidates tr.chosen")
    # the overlay lies exactly on the displayed image, and the crop preview has the box's shape
    pic = browser.find_element(By.ID, "original").rect
    svg = browser.find_element(By.ID, "overlay").rect
    assert abs(pic["width"] - svg["width"]) < 1 and abs(pic["height"] - svg["height"]) < 1
    assert abs(pic["x"] - svg["x"]) < 1 and abs(pic["y"] - svg["y"]) < 1
    canvas = browser.find_element(By.ID, "crop")
    cw, ch = int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))
    assert abs(cw / ch - 16 / 9) < 0.05
    assert "pipeline no-vlm" in browser.find_element(By.ID, "summary").text
    assert "no-vlm" in browser.find_element(By.ID, "engine").text


def test_page_shows_a_clear_error(server, browser, photos):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/")
    browser.find_element(By.ID, "image").send_keys(str(photos[0]))
    Select(browser.find_element(By.ID, "task")).select_by_value("ratio")
    ratio = browser.find_element(By.ID, "ratio")
    ratio.clear()
    ratio.send_keys("abc")
    browser.find_element(By.ID, "go").click()
    assert wait_state(browser) == "error"
    text = browser.find_element(By.ID, "status").text
    assert "422" in text and "bad aspect ratio" in text
    logs = browser.get_log("browser") if hasattr(browser, "get_log") else []
    assert not [e for e in logs if e.get("level") == "SEVERE" and "/v1/crop" not in e.get("message", "")], logs


def test_page_draws_the_automatic_subject(server, browser, photos):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from cropper_engine.engine.subject import detectors_available

    astronaut = next(p for p in photos if p.name == "astronaut.jpg")
    browser.get(server + "/")
    browser.find_element(By.ID, "image").send_keys(str(astronaut))
    Select(browser.find_element(By.ID, "subject")).select_by_value("auto")
    browser.find_element(By.ID, "go").click()
    assert wait_state(browser) == "done", browser.find_element(By.ID, "status").text
    summary = browser.find_element(By.ID, "summary").text
    assert "subject " in summary and "pipeline no-vlm" in summary
    assert browser.find_elements(By.CSS_SELECTOR, "#overlay #subject")  # the subject's box is drawn
    if detectors_available().get("faces"):
        assert "subject face" in summary
        assert browser.find_elements(By.CSS_SELECTOR, "#overlay rect.face")
        assert browser.find_elements(By.CSS_SELECTOR, "#overlay polygon.subject-outline")
    # a focal point: drawn as a dot
    Select(browser.find_element(By.ID, "subject")).select_by_value("custom")
    point = browser.find_element(By.ID, "subject-text")
    point.clear()
    point.send_keys("200,150")
    browser.find_element(By.ID, "go").click()
    assert wait_state(browser) == "done", browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#overlay circle.focal")
    assert "subject point" in browser.find_element(By.ID, "summary").text
    # keeping faces whole: on by default, and the box turns it off
    box = browser.find_element(By.ID, "keep-faces")
    assert box.is_selected()
    box.click()
    browser.find_element(By.ID, "go").click()
    assert wait_state(browser) == "done", browser.find_element(By.ID, "status").text
    assert json.loads(browser.find_element(By.ID, "json").get_attribute("textContent"))["keep_faces"] is False
