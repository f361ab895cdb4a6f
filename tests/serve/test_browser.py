"""The web page in headless Chromium (selenium + chromedriver): it loads the world's example references,
generates, shows the image with its seed, time and cache state; a second prompt hits the cache.

Skips when Chromium, chromedriver or selenium is missing (``apt-get install -y chromium chromium-driver``;
``pip install selenium``). A screenshot is written to tests/serve/.screenshots/ (ignored by git)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).resolve().parent / ".screenshots"


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def browser():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    chromium = _binary("chromium", "chromium-browser", "google-chrome")
    driver_path = _binary("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium or chromedriver not found (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="idcraft-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--window-size=1100,1250",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except Exception as exc:  # a broken install, no shared memory...: say why and skip
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium did not start: {str(exc).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_generates_on_the_offline_world(browser, make_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from idcraft.serve.server import BackgroundServer
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    app, service = make_app()
    wait = WebDriverWait(browser, 60)
    with BackgroundServer(app, service.config) as server:
        browser.get(server.url + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples img")) == 4)
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Ready"))
        options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#method option")]
        assert options == ["ip-adapter", "ip-adapter-plus", "faceid", "instantid"]
        browser.find_elements(By.CSS_SELECTOR, "#examples img")[1].click()
        browser.find_element(By.ID, "steps").send_keys("2")
        browser.find_element(By.ID, "seed").send_keys("11")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 1)
        image = browser.find_element(By.CSS_SELECTOR, "img.result")
        wait.until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        )
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 64
        assert browser.find_element(By.CSS_SELECTOR, "figure .seed").text == "11"
        assert browser.find_element(By.CSS_SELECTOR, "figure .cache").text == "miss"
        # a second prompt on the same reference: the identity cache answers
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a portrait at the beach")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 2)
        assert browser.find_element(By.CSS_SELECTOR, "figure .cache").text == "hit"  # newest first
        assert "error" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")
        # an uploaded picture becomes the reference (POST /v1/references)
        upload = tmp_path / "mine.png"
        reference_image(held_out_ids()[2]).save(upload)
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Reference uploaded"))
        assert browser.find_element(By.ID, "ref-preview").get_attribute("class") == "picked"
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 3)
        assert browser.find_element(By.CSS_SELECTOR, "figure .cache").text == "miss"
        SCREENSHOTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve-page.png"))
    assert service.metrics.cache_hits == 1 and service.metrics.cache_misses == 2
