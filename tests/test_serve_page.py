"""sdrt serve's web page (serve/static/index.html) in a real headless Chromium, against a real
`sdrt serve` of the tiny SD 1.5 artifact: the page fills its lists from the server, generates,
and shows the image, its parameters and the server's errors.

Debian's /usr/bin/chromium through Playwright (never `playwright install`, which downloads
browsers). The browser must reach nothing but the server on 127.0.0.1: the flags below stop
Chromium's own traffic to Google's hosts, every host name but 127.0.0.1 resolves to nothing,
and each test checks that every request the page made went to 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import io
import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from serve_helpers import start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # without these Chromium reaches out to Google's hosts (updates, sync, safe browsing)
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # and should anything still try: no proxy from the environment, and no name resolves
    "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
PROMPT = "a watercolor lighthouse at dusk"
GENERATION_TIMEOUT_MS = 120_000   # the first call opens the artifact's engines


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(sd15_artifacts):
    with start_server([sd15_artifacts]) as server:
        yield server


@pytest.fixture
def page(browser, server):
    """The page, opened from the server, with its lists loaded. After the test: every request
    it made stayed on 127.0.0.0/8, and its script raised nothing."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    urls: list[str] = []
    script_errors: list[str] = []
    context.on("request", lambda request: urls.append(request.url))
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(server.url)
    page.wait_for_selector("#sampler[data-loaded] option[value='Euler a']", state="attached")
    page.wait_for_selector("#model[data-loaded]", state="attached")
    yield page
    context.close()
    outside = [url for url in urls if not _is_loopback(url)]
    assert not outside, f"the page made requests outside 127.0.0.0/8: {outside}"
    assert not script_errors, f"the page's script raised: {script_errors}"


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "data":
        return True
    try:
        return ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


def _wait_for_image(page) -> None:
    page.wait_for_function(
        "() => { const img = document.getElementById('result-image');"
        " return !document.getElementById('result').hidden && img.complete && img.naturalWidth > 0; }",
        timeout=GENERATION_TIMEOUT_MS)


def test_page_generates_an_image_of_the_artifacts_size_with_its_parameters(page, sd15_artifacts):
    from sdrt.runtime.artifact import Artifact
    artifact = Artifact.open(sd15_artifacts)

    page.fill("#prompt", PROMPT)
    page.fill("#steps", "3")
    page.fill("#seed", "42")
    page.select_option("#sampler", "Euler a")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.click("#generate")
    _wait_for_image(page)

    request = sent.value.post_data_json
    assert request["width"] == artifact.width and request["height"] == artifact.height
    assert request["override_settings"]["sd_model_checkpoint"] == page.input_value("#model")
    size = page.evaluate("() => { const img = document.getElementById('result-image');"
                         " return [img.naturalWidth, img.naturalHeight]; }")
    assert size == [artifact.width, artifact.height]
    src = page.get_attribute("#result-image", "src")
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    png = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    assert (png.format, png.size) == ("PNG", (artifact.width, artifact.height))

    parameters = page.text_content("#parameters")
    assert parameters.startswith(PROMPT)
    for field in ("Steps: 3", "Sampler: Euler a", "Seed: 42"):
        assert field in parameters
    assert page.is_hidden("#error")
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt")


def test_page_shows_the_servers_error_for_zero_steps(page):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "0")
    with page.expect_response("**/sdapi/v1/txt2img") as answer:
        page.click("#generate")
    assert 400 <= answer.value.status < 500
    page.wait_for_selector("#error", state="visible")
    message = page.text_content("#error")
    assert str(answer.value.status) in message and "steps" in message.lower()
    assert page.is_hidden("#result")
    assert page.is_enabled("#generate")


def test_page_shows_the_steps_and_stops_when_interrupted(page):
    # 1000 Euler steps of the tiny model take seconds on CPU: long enough for the 300 ms polls
    # to see the run, and the interrupt ends it between steps.
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "1000")
    page.select_option("#sampler", "Euler")
    page.click("#generate")
    page.wait_for_function(
        "() => !document.getElementById('error').hidden"
        " || /^Step [1-9][0-9]*\\/1000\\b/.test(document.getElementById('progress-text').textContent)",
        timeout=GENERATION_TIMEOUT_MS)
    assert page.is_hidden("#error"), page.text_content("#error")
    assert 0 < page.evaluate("() => document.getElementById('progress').value") < 1
    assert page.is_disabled("#generate")
    with page.expect_response("**/sdapi/v1/txt2img") as answer:
        page.click("#interrupt")
    assert answer.value.status == 409   # sdrt's answer to a stopped generation
    page.wait_for_function("() => !document.getElementById('generate').disabled")
    # asked for, a stop is no error
    assert page.text_content("#progress-text") == "Interrupted"
    assert page.is_hidden("#error") and page.is_hidden("#result")
    assert page.is_disabled("#interrupt")


def test_page_says_the_server_is_busy_on_429(page):
    # Answered here: a busy server needs a second generation running at the same moment.
    page.route("**/sdapi/v1/txt2img", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7"}, json={"detail": "another generation is running"}))
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    message = page.text_content("#error")
    assert "busy" in message and "7 s" in message and "another generation is running" in message
    assert page.is_enabled("#generate")


def test_api_docs_render_every_route_from_this_server_only(page, server):
    # Swagger UI served by sdrt (no CDN) must read FastAPI's OpenAPI 3.1 description:
    # Swagger UI 4 cannot, and shows "Unable to render this definition" instead.
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock-summary-path", state="attached")
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/v1/images/edits"} <= set(paths)
    assert "Unable to render" not in page.content()
