"""The page at / and the offline /docs in a real browser: Playwright driving Debian's chromium, with
every request to another host blocked (the page must need nothing from outside)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from tests.live import LiveServer

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page(live_server: LiveServer):
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context()

        def route(request_route) -> None:
            url = request_route.request.url
            if url.startswith(live_server.url) or url.startswith("blob:") or url.startswith("data:"):
                request_route.continue_()
            else:
                outside.append(url)
                request_route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.outside = outside  # type: ignore[attr-defined]
        yield page
        browser.close()
    assert not outside, f"the page asked for other hosts: {outside}"


def test_upload_an_image_and_see_its_class(page, live_server: LiveServer, tmp_path: Path) -> None:
    image = tmp_path / "red.jpg"
    image.write_bytes(jpeg_bytes((220, 30, 30)))
    page.goto(live_server.url + "/")
    page.wait_for_selector("#variants tbody tr")  # the trade-off table came from /variants
    assert page.locator("#keep option").count() == 3  # the weight keeps of the tiny models
    page.set_input_files("#files", str(image))
    page.select_option("#keep", "0.5")
    page.click("#classify")
    page.wait_for_selector(".card")
    top = page.locator(".card .top").first.inner_text()
    assert top in ("cat", "dog", "frog")
    probability = page.locator(".card .prob").first.inner_text()
    assert probability.endswith("%") and 0 < float(probability[:-1]) <= 100
    assert "gate-keep0.50 (TTA 0)" in page.locator("#status").inner_text()  # the served level was preselected
    assert page.locator("tr.chosen").first.get_attribute("data-name") == "gate-keep0.50"
    page.select_option("#tta", "2")  # 6 views
    page.click("#classify")
    page.wait_for_function("document.querySelector('#status').textContent.includes('(TTA 2) answered')")
    # auto with a budget, across granularities
    page.check("input[value=auto]")
    page.fill("#max-drop", "10")
    page.click("#classify")
    page.wait_for_function("document.querySelector('#status').textContent.includes('answered')")
    page.wait_for_function("document.querySelector('#plot').naturalWidth > 0", timeout=30_000)  # the plot loaded


def test_docs_render_their_operations_offline(page, live_server: LiveServer) -> None:
    page.goto(live_server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/predict", "/variants", "/v2/models/{model}/infer"} <= {p.replace("\u200b", "") for p in paths}
    page.goto(live_server.url + "/redoc")
    page.wait_for_selector("text=/predict", timeout=20_000)
