"""A real browser on /v1/listen: Debian's chromium (headless, driven by Playwright) records a
fake microphone with MediaRecorder (webm/opus, a chunk every 250 ms) and streams it.

The microphone is a WAV of tone-coded words (tests/fakes/google_speech.py), so the fake
Google service names every word through Opus. The page authenticates like browser apps do,
with the `["token", key]` subprotocol, and shows the transcript; the test checks the words
and their times on the session clock.

Chromium's fake capture starts the file when the track starts, so the session clock is the
file's clock: every word must be within 0.1 s of where the file has it (seen: 0-10 ms).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from edge.app import App
from tests.fakes.google_speech import tone_encode
from tests.helpers.daemon import KEY, with_fake_google

CHROMIUM = os.environ.get("EDGE_TEST_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which(CHROMIUM),
                       reason=f"chromium is not installed at {CHROMIUM} (apt-get install chromium)"),
]

SEGMENTS = [(0, 1.0), (3, 0.5), (6, 0.4), (0, 0.6), (2, 0.5), (8, 0.4), (0, 1.0)]
RATE = 48000

PAGE = """<!doctype html><meta charset="utf-8"><title>listen</title>
<pre id="transcript"></pre>
<script>
window.messages = []; window.wsClosed = null;
async function run(url, key, seconds) {
  const ws = new WebSocket(url, ["token", key]);
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    window.messages.push(m);
    if (m.type === "Results" && m.is_final && m.channel.alternatives[0].transcript)
      document.getElementById("transcript").textContent +=
        m.channel.alternatives[0].transcript + " ";
  };
  ws.onclose = (e) => { window.wsClosed = {code: e.code, reason: e.reason}; };
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
  const stream = await navigator.mediaDevices.getUserMedia({audio: {
    echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  const recorder = new MediaRecorder(stream, {mimeType: "audio/webm;codecs=opus"});
  recorder.ondataavailable = (e) => { if (e.data.size) ws.send(e.data); };
  recorder.onstop = () => ws.send(JSON.stringify({type: "CloseStream"}));
  recorder.start(250);
  setTimeout(() => recorder.stop(), seconds * 1000);
}
</script>"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def page_server(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1: a loopback page may open a loopback websocket (Chromium's
    local network access checks refuse it from anywhere else)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def record_in_browser(pw: Any, app: App, site: str, mic: Path, seconds: float
                            ) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Open the page in headless chromium with `mic` as the microphone, record `seconds`;
    returns the messages, the close event and the transcript the page shows."""
    browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}%noloop",
    ])
    try:
        page = await browser.new_page()
        # http://127.0.0.1 is a secure context: getUserMedia works there.
        await page.goto(f"{site}/listen.html")
        url = f"ws://127.0.0.1:{app.server.port}/v1/listen"
        await page.evaluate("([u, k, s]) => run(u, k, s)", [url, KEY, seconds])
        await page.wait_for_function("window.wsClosed !== null", timeout=(seconds + 20) * 1000)
        closed: dict[str, Any] = await page.evaluate("window.wsClosed")
        messages: list[dict[str, Any]] = await page.evaluate("window.messages")
        shown = await page.text_content("#transcript")
    finally:
        await browser.close()
    return messages, closed, shown or ""


async def test_chromium_mediarecorder_webm_opus_is_transcribed_on_the_session_clock(tmp_path: Path) -> None:
    audio, script = tone_encode(SEGMENTS, RATE)
    mic = tmp_path / "mic.wav"
    sf.write(str(mic), audio, RATE, subtype="PCM_16")
    seconds = sum(s for _, s in SEGMENTS)
    (tmp_path / "listen.html").write_text(PAGE)
    async with with_fake_google(word_code="tone", edge_stt_language="en-US") as app, \
            playwright_api.async_playwright() as pw:
        with page_server(tmp_path) as site:
            messages, closed, shown = await record_in_browser(pw, app, site, mic, seconds)
    assert closed["code"] == 1000, (closed, messages)
    assert messages[-1]["type"] == "Metadata"
    words = [w for m in messages if m["type"] == "Results" and m["is_final"]
             for w in m["channel"]["alternatives"][0]["words"]]
    assert [w["word"] for w in words] == [s.text for s in script], json.dumps(messages)[:2000]
    assert shown.replace(".", "").split() == [s.text for s in script]  # the page showed them
    starts = np.array([w["start"] for w in words])
    ends = np.array([w["end"] for w in words])
    assert np.allclose(starts, [s.start / 16000 for s in script], atol=0.1), (starts, script)
    assert np.allclose(ends, [s.end / 16000 for s in script], atol=0.1), (ends, script)
