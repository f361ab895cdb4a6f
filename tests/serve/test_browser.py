"""The web page in headless Chromium (selenium + chromedriver): it loads the world's example references,
generates, shows the image with its seed, time and cache state; a second prompt hits the cache. Its
controls (negative prompt, guidance, size, number of images, the method's strengths), text-only
generation, the gallery's download links, progress and Cancel through the jobs API (and the plain call
where there is none), the favicon, and a phone-width layout.

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
        assert options == ["ip-adapter", "ip-adapter-plus", "faceid", "instantid", "none"]
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


def _ready(browser, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples img")) == 4)
    wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Ready"))
    return wait


def _pick(browser, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, select_id)).select_by_value(value)


def test_controls_text_only_gallery_download_and_favicon(browser, make_app):
    """Without a jobs API (404) the page falls back to the plain call with an indeterminate bar."""
    from selenium.webdriver.common.by import By

    from idcraft.serve.server import BackgroundServer

    app, service = make_app()
    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "path", "").startswith("/v1/jobs")]
    with BackgroundServer(app, service.config) as server:
        wait = _ready(browser, server.url)
        # example prompts use the world's words, and a click puts one in the prompt
        chips = browser.find_elements(By.CSS_SELECTOR, "#prompt-examples .chip")
        assert len(chips) == 5 and "beach" in chips[0].text
        chips[1].click()
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == chips[1].text
        assert "beach" in browser.find_element(By.ID, "vocabulary-list").get_attribute("textContent")
        sizes = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#size option")]
        assert sizes == ["", "32x32", "96x96", "128x128"]
        # the method's own strength: IdentityNet's only for InstantID, none for text-only
        assert not browser.find_element(By.ID, "identitynet-row").is_displayed()
        _pick(browser, "method", "instantid")
        assert browser.find_element(By.ID, "identitynet-row").is_displayed()
        assert browser.find_element(By.ID, "scale-label").text == "Identity scale"
        _pick(browser, "method", "none")
        assert not browser.find_element(By.ID, "scale-row").is_displayed()
        browser.find_element(By.ID, "negative").send_keys("dark")
        browser.find_element(By.ID, "guidance").send_keys("4")
        browser.find_element(By.ID, "steps").send_keys("2")
        browser.find_element(By.ID, "seed").send_keys("5")
        _pick(browser, "size", "96x96")
        _pick(browser, "n", "2")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 2)
        assert browser.execute_script("return state.jobsApi") is False  # fell back to the plain call
        links = browser.find_elements(By.CSS_SELECTOR, "figure a.download")
        assert [a.get_attribute("download") for a in links] == [
            "idcraft-none-5-0.png",
            "idcraft-none-5-1.png",
        ]
        assert all(a.get_attribute("href").startswith("data:image/png;base64,") for a in links)
        image = browser.find_element(By.CSS_SELECTOR, "img.result")
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 96)
        assert browser.find_element(By.CSS_SELECTOR, "figure .method").text == "none"
        assert "error" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")
        assert not browser.find_element(By.ID, "progress-box").is_displayed()
        # the favicon: linked from the page and served
        icon = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
        assert icon == server.url + "/favicon.ico"
        kind = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/favicon.ico').then(r => done(r.ok && r.headers.get('content-type')));"
        )
        assert kind == "image/svg+xml"
        assert browser.execute_script("return document.querySelector('header img').naturalWidth") > 0
        SCREENSHOTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve-page-desktop.png"))


def test_progress_bar_and_cancel_through_the_jobs_api(browser, make_app):
    """The page runs a generation as a job (POST /v1/jobs, polled): the bar shows the real step, and
    Cancel (DELETE /v1/jobs/{id}) stops the job on the server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    from idcraft.serve.server import BackgroundServer

    app, service = make_app()
    with BackgroundServer(app, service.config) as server:
        wait = _ready(browser, server.url)
        steps = browser.find_element(By.ID, "steps")
        steps.send_keys("2")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 1)
        assert browser.execute_script("return state.jobsApi") is True
        # a long job: the bar follows its steps, Cancel sends DELETE and the server stops it
        steps.clear()
        steps.send_keys("400")
        browser.find_element(By.ID, "generate").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "progress-text"), "of 400"))
        bar = browser.find_element(By.ID, "progress")
        wait.until(lambda d: int(bar.get_attribute("value") or 0) >= 1)
        assert bar.get_attribute("max") == "400"
        SCREENSHOTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve-page-progress.png"))
        browser.find_element(By.ID, "cancel").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Cancelled"))
        assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
        assert not browser.find_element(By.ID, "cancel").is_displayed()
        assert len(browser.find_elements(By.CSS_SELECTOR, "img.result")) == 1
        wait.until(lambda d: not service.jobs.active())  # stopped on the server, not only on the page


def test_phone_width_layout(browser, make_app):
    """At 390 px nothing overflows sideways and every control can be reached and used."""
    from selenium.webdriver.common.by import By

    from idcraft.serve.server import BackgroundServer

    app, service = make_app()
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
    )
    with BackgroundServer(app, service.config) as server:
        wait = _ready(browser, server.url)
        assert browser.execute_script("return window.innerWidth") == 390
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        too_wide = browser.execute_script(
            "return [...document.querySelectorAll('input, select, textarea, button, img, .chip')]"
            ".filter(e => e.offsetParent !== null && e.getBoundingClientRect().right > window.innerWidth + 0.5)"
            ".map(e => e.id || e.className || e.tagName)"
        )
        assert too_wide == []
        for control in ("prompt", "negative", "scale", "guidance", "steps", "size", "n", "seed", "generate"):
            element = browser.find_element(By.ID, control)
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            assert element.is_displayed() and element.is_enabled(), control
        browser.find_element(By.ID, "steps").send_keys("2")
        big = str(2**64 - 1)  # past a JS number's exact range: sent and shown as typed
        browser.find_element(By.ID, "seed").send_keys(big)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 1)
        assert browser.find_element(By.CSS_SELECTOR, "figure .seed").text == big
        assert big in browser.find_element(By.CSS_SELECTOR, "figure a.download").get_attribute("download")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        figure = browser.find_element(By.CSS_SELECTOR, "#results figure")
        assert figure.rect["x"] >= 0 and figure.rect["x"] + figure.rect["width"] <= 390
        SCREENSHOTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve-page-phone-gallery.png"))
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(SCREENSHOTS / "serve-page-phone.png"))
