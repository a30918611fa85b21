"""Google configuration: capabilities, credentials (ADC) and the upstream check, request shapes.

Credential discovery runs the real `google.auth.default()`. Where its environment must be
pristine (it reads some variables at import), the check runs in a child interpreter.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.cloud import speech_v1, speech_v2

from edge.clock import SAMPLE_RATE
from edge.health import Status
from edge.settings import load_settings
from edge.stt.base import StreamConfig
from edge.stt.google import GoogleUpstream, capabilities, check, create_upstream
from edge.stt.google_api import V1, V2, api_endpoint, classify
from tests.helpers.daemon import ROOT

GOOGLE_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT",
              "CLOUDSDK_CONFIG", "GCE_METADATA_HOST", "GCE_METADATA_IP", "NO_GCE_CHECK")


@pytest.fixture(autouse=True)
def _no_google_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in GOOGLE_ENV:
        monkeypatch.delenv(name, raising=False)
    gcloud = tmp_path / "gcloud"
    gcloud.mkdir()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(gcloud))  # no developer's gcloud login


def authorized_user(tmp_path: Path) -> Path:
    """A user credentials file as `gcloud auth application-default login` writes it."""
    path = tmp_path / "adc.json"
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "id.apps.example",
                                "client_secret": "secret", "refresh_token": "refresh"}))
    return path


# --- capabilities ---------------------------------------------------------------------------
@pytest.mark.parametrize(("api", "model", "language", "diarizes", "why"), [
    ("v2", "chirp_3", "auto", False, "auto"),
    ("v2", "chirp_3", "en-US", False, "chirp_3"),
    ("v2", "long", "auto", False, "auto"),
    ("v1", "latest_long", "en-US", True, None),
    ("v1", "phone_call", "auto", False, "auto"),
])
def test_capabilities_say_which_api_model_and_language_diarize_and_why_not(
    api: str, model: str, language: str, diarizes: bool, why: str | None,
) -> None:
    caps = capabilities(api, model, language)
    assert caps.diarization is diarizes
    if why is None:
        assert caps.reason is None
    else:
        assert caps.reason and why in caps.reason


async def test_upstream_capabilities_follow_the_api() -> None:
    settings = load_settings(edge_stt_endpoint="127.0.0.1:1", edge_stt_insecure=True)
    upstream = await create_upstream(settings)
    assert upstream is not None
    caps = upstream.capabilities("chirp_3", "auto")
    assert not caps.diarization and "auto" in (caps.reason or "")
    v1 = await create_upstream(load_settings(
        edge_stt_endpoint="127.0.0.1:1", edge_stt_insecure=True, edge_stt_api="v1",
        edge_stt_language="en-US"))
    assert v1 is not None and v1.capabilities("latest_long", "en-US").diarization


# --- credentials and the upstream check -----------------------------------------------------
NO_CREDENTIALS_SCRIPT = """
import asyncio, json, socket, time
from edge.health import Status
from edge.settings import load_settings
from edge.stt.google import create_upstream, resolve

async def main():
    status = Status(max_sessions=1)
    upstream = await create_upstream(load_settings(), status)
    # A metadata server that accepts and never answers: the lookup is bounded, off the loop.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen()
    ticks = 0
    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
    ticker = asyncio.create_task(tick())
    import os
    os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = "127.0.0.1:%d" % hung.getsockname()[1]
    import importlib, google.auth.compute_engine._metadata as md
    importlib.reload(md)
    t = time.monotonic()
    slow = await resolve(load_settings(), timeout=0.5)
    print(json.dumps({"upstream": upstream, "check": status.checks["upstream"],
                      "slow": slow.state, "slow_s": time.monotonic() - t, "ticks": ticks}))
asyncio.run(main())
"""


def test_no_credentials_means_unconfigured_not_a_crash(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in GOOGLE_ENV and not k.startswith("EDGE_")}
    empty = tmp_path / "edge.env"
    empty.write_text("")
    env.update(CLOUDSDK_CONFIG=str(tmp_path), HOME=str(tmp_path), EDGE_ENV_FILE=str(empty),
               GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    out = subprocess.run([sys.executable, "-c", NO_CREDENTIALS_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["upstream"] is None
    assert result["check"].startswith("unconfigured: no Google credentials")
    assert "credentials were not found" in result["check"]
    assert result["slow"] == "unconfigured: looking for Google credentials took over 0.5 s"
    assert result["slow_s"] < 2 and result["ticks"] > 10  # the loop kept running meanwhile


async def test_a_missing_credentials_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    status = Status(max_sessions=1)
    assert await create_upstream(load_settings(), status) is None
    assert status.checks["upstream"].startswith("unconfigured: no Google credentials")
    assert "/nonexistent/key.json" in status.checks["upstream"]


async def test_adc_credentials_and_project_make_a_regional_v2_upstream(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(authorized_user(tmp_path)))
    status = Status(max_sessions=1)
    settings = load_settings(edge_stt_project="room-project", edge_stt_location="eu")
    assert await check(settings) == "ok"
    upstream = await create_upstream(settings, status)
    assert isinstance(upstream, GoogleUpstream) and status.checks["upstream"] == "ok"
    assert upstream.endpoint == "eu-speech.googleapis.com" and not upstream.insecure
    assert type(upstream.credentials).__module__ == "google.oauth2.credentials"
    assert isinstance(upstream.api, V2)
    assert upstream.api.recognizer == "projects/room-project/locations/eu/recognizers/_"
    upstream.open_run(StreamConfig(language="auto", model="chirp_3")).end()
    assert upstream._client.api_endpoint == "eu-speech.googleapis.com"  # TLS, with the ADC
    await upstream.close()


async def test_v2_needs_a_project(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(authorized_user(tmp_path)))
    assert await check(load_settings()) == "unconfigured: no Google Cloud project: set EDGE_STT_PROJECT"
    assert await check(load_settings(edge_stt_api="v1", edge_stt_language="en-US")) == "ok"


@pytest.mark.parametrize(("overrides", "state"), [
    ({"edge_stt_api": "none"}, "unconfigured: EDGE_STT_API=none"),
    ({"edge_stt_api": "v1"}, "unconfigured: EDGE_STT_API=v1 needs a BCP-47 EDGE_STT_LANGUAGE"),
    ({"edge_stt_insecure": True}, "unconfigured: EDGE_STT_INSECURE needs EDGE_STT_ENDPOINT"),
    ({"edge_stt_endpoint": "127.0.0.1:1", "edge_stt_insecure": True}, "ok"),
])
async def test_the_upstream_check_says_why_no_upstream_was_made(
    overrides: dict[str, Any], state: str,
) -> None:
    status = Status(max_sessions=1)
    upstream = await create_upstream(load_settings(**overrides), status)
    assert status.checks["upstream"].startswith(state)
    assert (upstream is not None) is (state == "ok")


def test_api_endpoint_is_regional_or_global() -> None:
    assert api_endpoint("us") == "us-speech.googleapis.com"
    assert api_endpoint("europe-west4") == "europe-west4-speech.googleapis.com"
    assert api_endpoint("global") == "speech.googleapis.com"


# --- request and response shapes ------------------------------------------------------------
def test_the_v2_config_request_carries_the_stream_config() -> None:
    config = StreamConfig(language="auto", model="chirp_3", interim_results=True, punctuate=False,
                          vad_events=True, max_speakers=3)
    req = V2("p", "us").config_request(config, diarize=False)
    assert req.recognizer == "projects/p/locations/us/recognizers/_"
    c = req.streaming_config.config
    assert c.model == "chirp_3" and list(c.language_codes) == ["auto"]
    assert c.explicit_decoding_config.encoding == speech_v2.ExplicitDecodingConfig.AudioEncoding.LINEAR16
    assert c.explicit_decoding_config.sample_rate_hertz == SAMPLE_RATE
    assert c.explicit_decoding_config.audio_channel_count == 1
    assert c.features.enable_word_time_offsets and not c.features.enable_automatic_punctuation
    assert "diarization_config" not in c.features
    f = req.streaming_config.streaming_features
    assert f.interim_results and f.enable_voice_activity_events
    diarized = V2("p", "us").config_request(config, diarize=True).streaming_config.config.features
    assert diarized.diarization_config.max_speaker_count == 3
    audio = V2("p", "us").audio_request(b"\0" * 3200)
    assert len(speech_v2.StreamingRecognizeRequest.serialize(audio)) < 25600


def test_the_v1_config_request_carries_the_stream_config_and_refuses_auto() -> None:
    config = StreamConfig(language="de-DE", model="latest_long", max_speakers=2)
    req = V1().config_request(config, diarize=True)
    c = req.streaming_config.config
    assert c.language_code == "de-DE" and c.model == "latest_long"
    assert c.encoding == speech_v1.RecognitionConfig.AudioEncoding.LINEAR16
    assert c.sample_rate_hertz == SAMPLE_RATE and c.enable_word_time_offsets
    assert c.diarization_config.enable_speaker_diarization
    assert c.diarization_config.max_speaker_count == 2
    with pytest.raises(ValueError, match="v2"):
        V1().config_request(StreamConfig(language="auto", model="latest_long"), diarize=False)


def test_responses_parse_to_call_time() -> None:
    ms = datetime.timedelta(milliseconds=1)
    v2 = speech_v2.StreamingRecognizeResponse(results=[speech_v2.StreamingRecognitionResult(
        alternatives=[speech_v2.SpeechRecognitionAlternative(transcript="Hi there", confidence=0.8,
                      words=[speech_v2.WordInfo(start_offset=100 * ms, end_offset=400 * ms, word="Hi",
                                                speaker_label="2")])],
        is_final=True, result_end_offset=900 * ms, language_code="en-us")])
    [r], event = V2("p", "us").parse(speech_v2.StreamingRecognizeResponse.deserialize(
        speech_v2.StreamingRecognizeResponse.serialize(v2)))
    assert event is None and r.is_final and r.end == 0.9 and r.language == "en-us"
    assert (r.words[0].start, r.words[0].end, r.words[0].speaker_label) == (0.1, 0.4, "2")
    v1 = speech_v1.StreamingRecognizeResponse(
        speech_event_type=speech_v1.StreamingRecognizeResponse.SpeechEventType.SPEECH_ACTIVITY_BEGIN,
        speech_event_time=250 * ms)
    results, event = V1().parse(v1)
    assert results == [] and event is not None and (event.kind, event.offset) == ("speech_started", 0.25)


def test_interim_parts_parse_to_one_whole_hypothesis() -> None:
    """Google's interim response: the stable start and the unstable rest, two results."""
    ms = datetime.timedelta(milliseconds=1)

    def part(text: str, start: int, end: int, stability: float) -> Any:
        return speech_v2.StreamingRecognitionResult(
            alternatives=[speech_v2.SpeechRecognitionAlternative(transcript=text, words=[
                speech_v2.WordInfo(start_offset=start * ms, end_offset=end * ms, word=w)
                for w in text.split()])],
            is_final=False, stability=stability, result_end_offset=end * ms)

    response = speech_v2.StreamingRecognizeResponse(results=[
        part("the quick", 0, 600, 0.9), part(" brown", 600, 900, 0.1)])
    [r], _ = V2("p", "us").parse(speech_v2.StreamingRecognizeResponse.deserialize(
        speech_v2.StreamingRecognizeResponse.serialize(response)))
    assert not r.is_final and r.transcript == "the quick brown" and r.end == 0.9
    assert [w.word for w in r.words] == ["the", "quick", "brown"]


def test_errors_are_classified() -> None:
    from google.api_core import exceptions as e

    assert classify(e.ServiceUnavailable("x")) == "retry"
    assert classify(e.InternalServerError("x")) == "unclear"  # retried; may hide a status
    assert classify(e.ResourceExhausted("x")) == "retry"
    assert classify(e.DeadlineExceeded("x")) == "retry"
    assert classify(e.Aborted("Max duration of 5 minutes reached")) == "limit"
    assert classify(e.OutOfRange("Exceeded maximum allowed stream duration")) == "limit"
    for fatal in (e.InvalidArgument, e.Unauthenticated, e.PermissionDenied, e.NotFound):
        assert classify(fatal("x")) == "fatal"
    assert classify(RuntimeError("a bug")) == "fatal"

