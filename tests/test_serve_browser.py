"""The web page in a real browser (Debian's Chromium, headless, driven by Playwright): a person enters the key,
uploads a photograph with the keyboard only, sees findings, heatmap and similar cases, then triages a batch."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from retfm.serve.app import create_app
from retfm.serve.config import ServeConfig
from tests.conftest import shared_file
from tests.test_serve import KEY, blurred_photo, make_served_model

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn on a free loopback port in a thread, stopped after the module."""
    import uvicorn

    model, index = make_served_model(tmp_path_factory.mktemp("browser"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(model=model, index=index, api_key=KEY)),
                                                   host="127.0.0.1", port=port, log_level="warning", ws="none"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(server)
        yield page
        browser.close()


def focused(page) -> str:
    return page.evaluate("document.activeElement.id")


def test_keyboard_upload_shows_findings_heatmap_and_similar_cases(page, tmp_path):
    # Listen for the file chooser from the start: Playwright intercepts it only once a listener is registered,
    # and registering just before the key press races with the press.
    photo = shared_file("retina_cc0.jpg")  # skips here, not inside the browser's callback, when it is absent
    chosen = []

    def choose(chooser):
        chosen.append(True)
        chooser.set_files(str(photo))
    page.on("filechooser", choose)
    page.focus("#api-key")
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#model:not([hidden])")
    assert "tiny-vit-finding" in page.inner_text("#model-name")
    assert "Not a medical device" in page.inner_text("#model-facts")

    page.focus("#api-key")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert focused(page) == "drop-zone"  # focus order: key, its button, then the upload
    page.keyboard.press("Enter")
    page.wait_for_selector("#result:not([hidden])")
    assert chosen == [True]
    assert focused(page) == "result"  # the findings take focus, so a screen reader reads them next
    verdict = page.inner_text("#verdict")
    assert verdict.startswith("Gradable.") and "risk" in verdict
    assert page.locator("#probabilities tbody tr").count() == 2
    assert page.is_visible("#heatmap") and not page.is_visible("#photo")
    page.wait_for_function("document.getElementById('heatmap').complete")
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") == 448
    assert "Grad-CAM" in page.get_attribute("#heatmap", "alt")
    assert page.locator("#cases tbody tr").count() == 5
    page.focus("#show-heatmap")
    page.keyboard.press("Space")
    assert page.is_visible("#photo") and not page.is_visible("#heatmap")
    page.screenshot(path=str(tmp_path / "findings.png"), full_page=True)


def test_batch_upload_fills_the_triage_table(page, tmp_path):
    # pytest-xdist may run this test in a worker where the keyboard test did not enter the key first
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model:not([hidden])")
    (tmp_path / "out_of_focus.jpg").write_bytes(blurred_photo())
    (tmp_path / "notes.txt").write_text("not an image")
    page.set_input_files("#file-input", [str(shared_file("retina_cc0.jpg")), str(tmp_path / "out_of_focus.jpg"),
                                         str(tmp_path / "notes.txt")])
    page.wait_for_selector("#triage:not([hidden])")
    rows = page.locator("#triage tbody tr")
    assert rows.count() == 3
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(3)]
    assert [c[1] for c in cells] == ["retina_cc0.jpg", "out_of_focus.jpg", "notes.txt"]  # names from the page
    assert cells[0][2].startswith("gradable") and cells[1][2] == "ungradable" and cells[2][2] == "rejected"
    assert "1 gradable, 1 ungradable, 1 rejected" in page.inner_text("#triage-summary")
    page.screenshot(path=str(tmp_path / "triage.png"), full_page=True)
