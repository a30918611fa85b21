"""Google Cloud Speech-to-Text as the upstream: settings, credentials, capabilities, wiring.

Wiring (the composition root):

    upstream = await create_upstream(settings, status, metrics)  # sets the `upstream` check
    # None -> no credentials / EDGE_STT_API=none: sessions run diarization-only
    run = upstream.open_run(config)  # per session channel: run.push(block) ...; run.events()
    await upstream.close()  # at shutdown, after the sessions

Nothing here imports grpc or the google packages at module level: they load in
`create_upstream`, so a daemon without an upstream does not pay for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from edge.health import Status
from edge.metrics import Metrics
from edge.settings import Settings
from edge.stt.base import Capabilities, StreamConfig
from edge.stt.policy import Backoff
from edge.stt.stream import Api, Hooks, RunParams, StreamRun

log = logging.getLogger("edge.stt")

ADC_TIMEOUT_S = 10.0  # google.auth.default() may probe the GCE metadata server off Google Cloud
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
T = TypeVar("T")


def capabilities(api: str, model: str, language: str) -> Capabilities:
    """Whether Google labels speakers for `model`/`language` on `api` ("v1" | "v2"), as
    verified (docs/notes/google-speech.md): streaming diarization is unavailable for chirp_3 and
    for language `auto`, available for v1 models with enable_speaker_diarization. Whether it
    is used is the session plan's choice (edge/plan.py, EDGE_STT_DIARIZATION)."""
    if language == "auto":
        return Capabilities(False, "language 'auto': Google streaming has no diarization")
    if api == "v2":
        if model.startswith("chirp_3"):
            return Capabilities(False, f"{model}: Google diarizes it in batch recognition only")
        return Capabilities(False, f"{model} on v2: streaming diarization not verified "
                                   "(EDGE_STT_DIARIZATION=google forces it)")
    return Capabilities(True, None)


class GoogleUpstream(Hooks):
    """The `Upstream` for Google: one per daemon, one `StreamRun` per session.

    Also the runs' `Hooks`: errors, restarts and lost audio go to the metrics; outages and
    lost audio to the status (notices, and the `upstream` check while a session reconnects).
    """

    def __init__(self, api: Api, *, endpoint: str, insecure: bool = False, credentials: Any = None,
                 params: RunParams | None = None,
                 status: Status | None = None, metrics: Metrics | None = None) -> None:
        self.api, self.endpoint, self.insecure, self.credentials = api, endpoint, insecure, credentials
        self.params = params or RunParams()
        self.status, self.metrics = status, metrics
        self._client: Any = None
        self._ids = itertools.count(1)
        self._failing: dict[int, str] = {}  # run -> last error, while it reconnects

    # --- the Upstream contract ---
    def capabilities(self, model: str, language: str) -> Capabilities:
        return capabilities(self.api.name, model, language)

    def open_run(self, config: StreamConfig) -> StreamRun:
        """The upstream run for one session channel (`edge.stt.stream.StreamRun`). Call it
        inside the running loop. Never raises for Google's errors: they become `error` events
        (fatal=True when the run ends)."""
        if self._client is None:
            # Created here, inside the running loop its grpc.aio channel will belong to.
            self._client = self.api.client(endpoint=self.endpoint, insecure=self.insecure,
                                           credentials=self.credentials)
        return StreamRun(self.api, self._client, config, diarize=config.diarize,
                         params=self.params, hooks=self, run_id=next(self._ids))

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.transport.close()

    # --- Hooks ---
    def call_opened(self, run_id: int, cause: str | None) -> None:
        if cause and self.metrics is not None:
            self.metrics.upstream_restarts.labels(cause=cause).inc()

    def call_healthy(self, run_id: int) -> None:
        if self._failing.pop(run_id, None) is not None:
            self._notice(f"stream {run_id}: reconnected")
            self._update_check()

    def call_failed(self, run_id: int, exc: BaseException | str, kind: str) -> None:
        name = exc if isinstance(exc, str) else type(exc).__name__
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(error=name.replace(" ", "_")).inc()
        if kind == "limit":
            return  # Google's per-call limit: a rotation we did not get to, not an outage
        detail = name if isinstance(exc, str) else f"{name}: {getattr(exc, 'message', exc)}"
        if kind == "fatal":
            self._notice(f"stream {run_id}: ended by {detail}")
        elif run_id not in self._failing:
            self._notice(f"stream {run_id}: {detail}; reconnecting")
        if kind != "fatal":
            self._failing[run_id] = name
        self._update_check()

    def audio_lost(self, run_id: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_lost_seconds.inc(seconds)
        self._notice(f"stream {run_id}: {seconds:.1f} s of audio not transcribed "
                     f"(outage longer than the {self.params.replay_s:g} s replay buffer)")

    def run_ended(self, run_id: int) -> None:
        if self._failing.pop(run_id, None) is not None:
            self._update_check()

    def _notice(self, message: str) -> None:
        log.warning("upstream: %s", message)
        if self.status is not None:
            self.status.notice("upstream", message)

    def _update_check(self) -> None:
        if self.status is None:
            return
        if not self._failing:
            self.status.set_check("upstream", "ok")
        else:
            last = next(reversed(self._failing.values()))
            self.status.set_check("upstream", f"degraded: {len(self._failing)} stream(s) "
                                              f"reconnecting ({last})")


# --- configuration and credentials ------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """The outcome of looking for what the upstream needs: `state` is the `upstream` check
    ("ok" or "unconfigured: <reason>")."""

    state: str
    credentials: Any = None
    project: str | None = None


def resolve_blocking(settings: Settings) -> Resolved:
    """Find credentials and project the standard Google way (ADC). Blocks (file reads, maybe
    the GCE metadata server): call `resolve()` from the event loop instead. Never raises."""
    api = settings.edge_stt_api
    if api == "none":
        return Resolved("unconfigured: EDGE_STT_API=none")
    if api == "v1" and settings.edge_stt_language == "auto":
        return Resolved("unconfigured: EDGE_STT_API=v1 needs a BCP-47 EDGE_STT_LANGUAGE, not 'auto'")
    if settings.edge_stt_insecure and not settings.edge_stt_endpoint:
        return Resolved("unconfigured: EDGE_STT_INSECURE needs EDGE_STT_ENDPOINT")
    if settings.edge_stt_endpoint and settings.edge_stt_insecure:
        # A plaintext channel to a local fake or an on-prem proxy: no Google credentials.
        return Resolved("ok", None, settings.edge_stt_project or "local")
    try:
        import google.auth
        import google.auth.exceptions

        credentials, project = google.auth.default(scopes=list(SCOPES))
    except ImportError as exc:
        return Resolved(f"unconfigured: google-auth not installed ({exc.name})")
    except Exception as exc:  # DefaultCredentialsError, a malformed key file, ...
        reason = str(exc).split(". ")[0].strip().rstrip(".")
        return Resolved(f"unconfigured: no Google credentials (GOOGLE_APPLICATION_CREDENTIALS "
                        f"or ADC): {reason}")
    project = settings.edge_stt_project or project
    if api == "v2" and not project:
        return Resolved("unconfigured: no Google Cloud project: set EDGE_STT_PROJECT")
    return Resolved("ok", credentials, project)


async def resolve(settings: Settings, *, timeout: float = ADC_TIMEOUT_S) -> Resolved:
    """`resolve_blocking()` off the event loop, in a daemon thread (a hung metadata probe must
    not hold up shutdown), bounded by `timeout` seconds."""
    try:
        return await _in_thread(lambda: resolve_blocking(settings), timeout)
    except asyncio.TimeoutError:
        return Resolved(f"unconfigured: looking for Google credentials took over {timeout:g} s")


async def check(settings: Settings) -> str:
    """The `upstream` check for `settings`: "ok" or "unconfigured: <reason>"."""
    return (await resolve(settings)).state


async def create_upstream(settings: Settings, status: Status | None = None,
                          metrics: Metrics | None = None, *,
                          backoff: Backoff | None = None) -> GoogleUpstream | None:
    """The Google upstream for `settings`, or None when it cannot run (no credentials, no
    project, EDGE_STT_API=none, packages missing): then sessions run diarization-only.
    Sets the `upstream` check on `status`. Never raises for configuration problems."""
    resolved = await resolve(settings)
    api: Any = None
    if resolved.state == "ok":
        try:
            from edge.stt import google_api
        except ImportError as exc:
            resolved = Resolved(f"unconfigured: google-cloud-speech not installed ({exc.name})")
        else:
            location = settings.edge_stt_location
            api = (google_api.V2(resolved.project or "local", location)
                   if settings.edge_stt_api == "v2" else google_api.V1())
    if status is not None:
        status.set_check("upstream", resolved.state)
    if api is None:
        log.warning("upstream %s: sessions run diarization-only", resolved.state)
        return None
    endpoint = settings.edge_stt_endpoint or _api_endpoint(settings.edge_stt_location)
    log.info("upstream: Google Speech-to-Text %s at %s (model %s, language %s)",
             api.name, endpoint, settings.edge_stt_model, settings.edge_stt_language)
    params = RunParams(rotate_s=settings.edge_stt_rotate_s, replay_s=settings.edge_stt_replay_s,
                       backoff=backoff or Backoff())
    return GoogleUpstream(api, endpoint=endpoint, insecure=settings.edge_stt_insecure,
                          credentials=resolved.credentials,
                          params=params,
                          status=status, metrics=metrics)


def _api_endpoint(location: str) -> str:
    from edge.stt.google_api import api_endpoint

    return api_endpoint(location)


async def _in_thread(fn: Callable[[], T], timeout: float) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if not done.done():
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop may be gone by now
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name="edge-google-adc", daemon=True).start()
    return await asyncio.wait_for(done, timeout)


__all__ = ["GoogleUpstream", "Resolved", "capabilities", "check", "create_upstream", "resolve",
           "resolve_blocking"]
