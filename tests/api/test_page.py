"""The browser page (`GET /`): served by the service under a strict policy, and driven in a real
browser (Debian's chromium, headless, through Playwright) against a real server on the bundled
model, with Chromium's fake microphone playing a bundled sample.

Screenshots of each state are written to a `page-screenshots` folder under pytest's temporary
directory; its path is printed at the end of the run.
"""

import http.client
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import soundfile as sf
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Playwright,
    WebSocket,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from service.api.app import create_app
from service.api.routes.page import ASSETS
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import LiveServer

SAMPLES = DEFAULT_MODEL_DIR / "samples"
KEY = "page-test-key"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
    "--use-fake-device-for-media-stream",
]


def _settings(**overrides: object) -> Settings:
    return Settings(model_dir=DEFAULT_MODEL_DIR, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(create_app(_settings())) as live:
        yield live


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    with LiveServer(create_app(_settings(api_keys=[KEY]))) as live:
        yield live


# ------------------------------------------------------------------ served as a page should be


def test_page_and_assets_are_served_same_origin_under_a_strict_policy(server: LiveServer) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"

    # every asset the page names is local and served with its type; nothing comes from elsewhere
    referenced = set(re.findall(r'(?:src|href)="([^"]+)"', page.text))
    for asset in ASSETS.values():
        text = asset[0].read_text()
        referenced |= set(re.findall(r'(?:from |addModule\()"([^"]+)"', text))
        # no CDN, no remote font (an SVG's XML namespace is a name, not a fetch)
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\b)", text), asset[0].name
    assets = {path for path in referenced if path.startswith("/static/")}
    assert referenced - assets == {"/docs"}
    assert {"/static/app.js", "/static/transport.js", "/static/capture-worklet.js"} <= assets
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in assets:
        response = httpx.get(server.url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(types[Path(path).suffix]), path


def test_only_the_listed_assets_are_served(server: LiveServer) -> None:
    missing = httpx.get(server.url + "/static/page.py")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    # a path that climbs out of the folder matches no route
    assert _raw_get(server, "/static/../routes/page.py") == 404


def _raw_get(server: LiveServer, path: str) -> int:
    """The status of GET `path` sent as is (httpx would normalise the dot segments away)."""
    host = urlsplit(server.url)
    connection = http.client.HTTPConnection(host.hostname or "", host.port)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_with_keys_the_page_is_open_and_its_config_is_not(keyed_server: LiveServer) -> None:
    url = keyed_server.url
    assert httpx.get(url + "/").status_code == 200
    assert httpx.get(url + "/static/app.js").status_code == 200
    # the open prefix opens nothing else: a climbing path reaches no route
    assert _raw_get(keyed_server, "/static/../v1/models") == 404
    assert _raw_get(keyed_server, "/static/%2e%2e/v1/models") == 404
    assert httpx.get(url + "/v1/models").status_code == 401
    refused = httpx.get(url + "/ui/config")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    config = httpx.get(url + "/ui/config", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert config["model"] == "w2v2-bert-commands-en"
    assert config["language"] == "en"
    assert config["sampling_rate"] == 16_000
    assert config["auth"] is True
    assert set(config["response_formats"]) == {"json", "text", "verbose_json", "srt", "vtt"}


# ------------------------------------------------------------------ in a real browser


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("the browser tests need Debian's chromium: apt-get install -y chromium")
    return found


@pytest.fixture(scope="module")
def shots(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """Where the screenshots go; the path is printed when the module's tests are done."""
    folder = tmp_path_factory.getbasetemp() / "page-screenshots"
    folder.mkdir(exist_ok=True)
    yield folder
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\npage screenshots: {folder}")


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone's input: a bundled sample between stretches of room silence (the
    fake device loops its file; the pause after the words is what ends the utterance)."""
    audio, rate = sf.read(SAMPLES / "06-turn-on-the.wav", dtype="int16")
    silence = np.zeros(int(0.8 * rate), np.int16)
    path = tmp_path_factory.mktemp("microphone") / "mic.wav"
    sf.write(path, np.concatenate([silence, audio, silence, silence]), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(microphone: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        yield _launch(playwright, microphone)


def _launch(playwright: Playwright, microphone: Path) -> Browser:
    return playwright.chromium.launch(
        executable_path=_chromium(),
        headless=True,
        args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={microphone}"],
    )


class Watched:
    """A page whose console is watched for policy violations and script errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        text = message.text
        if "Content Security Policy" in text or "Trusted Type" in text or message.type == "warning":
            self.problems.append(text)

    def assert_clean(self) -> None:
        assert self.problems == []


@pytest.fixture
def desktop(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1100, "height": 760}, accept_downloads=True)
    watched = Watched(context.new_page())
    yield watched
    context.close()


def _ready(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#model-dot")).to_have_class(re.compile(r"\bok\b"))
    expect(page.locator("#model-name")).to_have_text("w2v2-bert-commands-en")


def _shot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=shots / f"{name}.png", animations="disabled", full_page=True)


class Relay:
    """Between the page and the real server's websocket: records what the page sends, and holds
    the server's finals back until released, so that the state before a final can be seen."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.sent: list[str | bytes] = []
        self.held: list[str | bytes] = []
        self.holding = True
        self.route: WebSocketRoute | None = None
        page.route_web_socket(re.compile(r".*/v1/audio/stream.*"), self._connect)

    def _connect(self, route: WebSocketRoute) -> None:
        self.route = route
        self.urls.append(route.url)
        server = route.connect_to_server()

        def to_server(message: str | bytes) -> None:
            self.sent.append(message)
            server.send(message)

        route.on_message(to_server)
        server.on_message(self._to_page)

    def _to_page(self, message: str | bytes) -> None:
        assert self.route is not None
        if self.holding and '"transcript.final"' in str(message):
            self.held.append(message)
        else:
            self.route.send(message)

    def release(self) -> None:
        self.holding = False
        assert self.route is not None
        for message in self.held:
            self.route.send(message)
        self.held.clear()


@pytest.mark.slow
def test_live_microphone_to_final_transcript(
    server: LiveServer, desktop: Watched, shots: Path
) -> None:
    page = desktop.page
    _ready(page, server.url)
    expect(page.locator("#model-language")).to_have_text("en")
    _shot(page, shots, "live-1-ready")

    relay = Relay(page)
    page.click("#record")
    expect(page.locator("#record")).to_have_attribute("aria-pressed", "true")
    # while the words are spoken: the level meter moves, an open line shows the partials, the
    # words that may still change in a lighter style
    expect(page.locator("#meter")).not_to_have_attribute("aria-valuenow", "-60", timeout=10_000)
    open_line = page.locator("#lines li.open")
    expect(open_line.locator(".tail")).not_to_have_text("", timeout=30_000)
    expect(open_line.locator(".tail")).to_have_css("font-style", "italic")
    colours = open_line.evaluate(
        "line => ['.committed', '.tail'].map(c => getComputedStyle(line.querySelector(c)).color)"
    )
    assert colours[0] != colours[1]
    expect(page.locator("#latency")).to_have_text(re.compile(r"^\d+\.\d\d s$"))
    _shot(page, shots, "live-2-listening")
    relay.release()

    final = page.locator("#lines li.final").first
    expect(final.locator(".text")).to_have_text("turn on the lights", timeout=30_000)
    expect(open_line).to_have_count(0)
    # the final's time range lies within the 0.8-2.4 s where the sample speaks
    start, end = (_seconds(t) for t in final.locator("time").inner_text().split(" – "))
    assert 0.5 <= start < end <= 3.0
    for readout in ("#latency", "#latency-final"):  # seconds, not milliseconds
        expect(page.locator(readout)).to_have_text(re.compile(r"^\d+\.\d\d s$"))
        assert 0 <= float(page.locator(readout).inner_text().split()[0]) < 10
    _shot(page, shots, "live-3-final")
    # the worklet sent 16-bit PCM at the model's rate, in 50 ms messages
    assert len(relay.urls) == 1
    assert "/v1/audio/stream?sample_rate=16000&encoding=pcm_s16le" in relay.urls[0]
    assert len(relay.sent) >= 20
    assert {len(m) if isinstance(m, bytes) else -1 for m in relay.sent} == {1600}

    page.click("#record")
    expect(page.locator("#live-state")).to_have_text(re.compile("^Stopped"), timeout=30_000)
    expect(page.locator("#record")).to_have_attribute("aria-pressed", "false")
    _shot(page, shots, "live-4-stopped")
    desktop.assert_clean()


# Some browsers (older Firefox) refuse to connect a microphone to an AudioContext at another rate.
REFUSE_RESAMPLING = """
const Native = window.AudioContext;
window.AudioContext = class extends Native {
  constructor(options) { super(options); this.fixedRate = Boolean(options && options.sampleRate); }
  createMediaStreamSource(stream) {
    if (this.fixedRate) throw new DOMException("different sample-rate", "NotSupportedError");
    return super.createMediaStreamSource(stream);
  }
};
"""


@pytest.mark.slow
def test_live_at_the_device_rate_where_the_browser_cannot_resample(
    server: LiveServer, desktop: Watched
) -> None:
    page = desktop.page
    page.add_init_script(REFUSE_RESAMPLING)
    sockets: list[WebSocket] = []
    page.on("websocket", lambda socket: sockets.append(socket))
    _ready(page, server.url)
    page.click("#record")
    expect(page.locator("#lines li.final .text").first).to_have_text(
        "turn on the lights", timeout=30_000
    )
    page.click("#record")
    expect(page.locator("#live-state")).to_have_text(re.compile("^Stopped"), timeout=30_000)
    rate = int(re.findall(r"sample_rate=(\d+)", sockets[0].url)[0])
    assert rate != 16_000  # the device's own rate, resampled by the server
    desktop.assert_clean()


def _seconds(clock: str) -> float:
    minutes, seconds = clock.strip().split(":")
    return int(minutes) * 60 + float(seconds)


def _drop_file(page: Page, selector: str, path: Path) -> None:
    """Drag and drop `path` onto `selector`, through a real `DataTransfer`."""
    transfer = page.evaluate_handle(
        """([name, bytes]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "audio/wav" }));
            return transfer;
        }""",
        [path.name, list(path.read_bytes())],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


@pytest.mark.slow
def test_file_to_subtitles_download_and_the_api_error(
    server: LiveServer, desktop: Watched, shots: Path, tmp_path: Path
) -> None:
    sample = SAMPLES / "00-two-five-nine.wav"
    expected = httpx.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": sample.read_bytes()},
        data={"response_format": "srt"},
    ).text
    page = desktop.page
    _ready(page, server.url)
    expect(page).to_have_title("w2v2-bert-commands-en · speech-serve")
    page.click("#tab-file")
    expect(page.locator("#panel-file")).to_be_visible()
    _shot(page, shots, "file-1-empty")

    _drop_file(page, "#drop", sample)  # as a person drags it from their files
    expect(page.locator("#drop-title")).to_have_text(sample.name)
    page.select_option("#format", "srt")
    page.click("#transcribe")
    cue = page.locator("#cues li").first
    expect(cue.locator(".text")).to_have_text("two five nine seven nine")
    expect(cue.locator("time")).to_have_text("00:00:00,000 → 00:00:03,326")
    _shot(page, shots, "file-2-subtitles")
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "00-two-five-nine.srt"
    saved = tmp_path / "saved.srt"
    download.value.save_as(saved)
    assert saved.read_text() == expected

    garbage = tmp_path / "noise.mp3"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    refusal = httpx.post(
        server.url + "/v1/audio/transcriptions", files={"file": garbage.read_bytes()}
    )
    assert refusal.status_code == 415
    page.set_input_files("#file-input", garbage)
    expect(page.locator("#result")).to_be_hidden()  # the last file's result goes with it
    page.click("#transcribe")
    expect(page.locator("#file-error")).to_contain_text(refusal.json()["error"]["message"])
    expect(page.locator("#file-error")).to_contain_text("415")
    _shot(page, shots, "file-3-error")
    # a browser logs a failed fetch as an error; nothing else may appear
    desktop.problems = [p for p in desktop.problems if "status of 415" not in p]
    desktop.assert_clean()


@pytest.mark.slow
def test_phone_layout_has_no_sideways_scroll(
    server: LiveServer, browser: Browser, shots: Path
) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        color_scheme="dark",
    )
    page = context.new_page()
    _ready(page, server.url)
    for selector in ("#record", "#tab-file", "#live-clear"):
        box = page.locator(selector).bounding_box()
        assert box is not None
        assert box["x"] >= 0, selector
        assert box["x"] + box["width"] <= 390, selector
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    _shot(page, shots, "phone-1-live")
    page.tap("#tab-file")
    expect(page.locator("#drop-title")).to_have_text(
        "Choose an audio file", use_inner_text=True
    )  # nothing to drop on a touch screen
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    _shot(page, shots, "phone-2-file")
    context.close()


@pytest.mark.slow
def test_api_key_is_asked_for_and_used_live(
    keyed_server: LiveServer, desktop: Watched, shots: Path
) -> None:
    page = desktop.page
    page.goto(keyed_server.url + "/")
    form = page.locator("#key-form")
    expect(form).to_be_visible()
    expect(page.locator("#record")).to_be_disabled()
    _shot(page, shots, "key-1-asked")

    page.fill("#key-input", "wrong-key")
    page.click("#key-form button")
    expect(page.locator("#key-hint")).to_contain_text("refused")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    expect(page.locator("#model-name")).to_have_text("w2v2-bert-commands-en")
    expect(form).to_be_hidden()
    expect(page.locator("#key-input")).to_have_value("")  # not left in the page
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0

    page.click("#record")  # the websocket carries the key as ?api_key=
    expect(page.locator("#lines li.final .text").first).to_have_text(
        "turn on the lights", timeout=30_000
    )
    page.click("#record")
    expect(page.locator("#live-state")).to_have_text(re.compile("^Stopped"), timeout=30_000)
    _shot(page, shots, "key-2-live")
    desktop.problems = [p for p in desktop.problems if "status of 401" not in p]
    desktop.assert_clean()


def test_page_config_agrees_with_the_models_list(server: LiveServer) -> None:
    config = httpx.get(server.url + "/ui/config").json()
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert (config["model"], config["sampling_rate"]) == (model["id"], model["sampling_rate"])
    assert config["architecture"] == model["architecture"]
    assert config["auth"] is False
