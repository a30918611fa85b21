"""What the diarization engine tells the status channel and the metrics.

`EngineReport` keeps the figures that exist only to be reported — the live RTF (worker compute
over audio stepped in the last `RTF_WINDOW_S`) and the throttled volatile figures — and writes
one snapshot of the engine into `Status.update_diarizer` and the gauges. States go out at once;
the ever-changing figures (RTF, worker RSS) at most every VOLATILE_EVERY_S, so status
subscribers are not pushed a snapshot four times a second.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from edge.clock import FRAME_SAMPLES
from edge.device import MB
from edge.diarization.session import DiarizerSession, DiarizerState
from edge.health import Status
from edge.metrics import Metrics

RTF_WINDOW_S = 30.0
VOLATILE_EVERY_S = 5.0


class EngineReport:
    """The engine's reporting side: `step()` for each answered unit, `publish()` on change."""

    def __init__(self, status: Status, metrics: Metrics) -> None:
        self.status, self.metrics = status, metrics
        self._work: deque[tuple[float, float, float]] = deque(maxlen=1024)  # (t, compute, audio)
        self._volatile_at = 0.0
        self._volatile: dict[str, Any] = {"rtf": None, "memory_used_mb": None}

    def step(self, now: float, compute_s: float, audio_s: float, frames: int) -> None:
        """The worker answered a unit of `audio_s` in `compute_s`, with `frames` frames."""
        self._work.append((now, compute_s, audio_s))
        if frames:
            self.metrics.diarizer_step.observe(compute_s)

    def publish(self, *, state: str | None, reason: str | None, sessions: Sequence[DiarizerSession],
                rss: int, progress: str | None, figures: dict[str, Any], **fields: Any) -> None:
        """Write the engine's snapshot. `state`/`reason`: the engine's status words (None: keep
        the last ones); `sessions`: its open sessions; `rss`, `progress`: the worker's;
        `figures`: the worker's READY measurements; `fields`: further status fields as they are."""
        now = time.monotonic()
        while self._work and now - self._work[0][0] > RTF_WINDOW_S:
            self._work.popleft()
        audio = sum(w[2] for w in self._work)
        rtf = round(sum(w[1] for w in self._work) / audio, 3) if audio else None
        if rtf is not None:
            self.metrics.diarizer_rtf.set(rtf)
        if now - self._volatile_at >= VOLATILE_EVERY_S or rss == 0:
            self._volatile_at = now
            self._volatile = {"rtf": rtf, "memory_used_mb": rss // MB or None}
        waiting = sum(s.feed.pending_samples for s in sessions) // FRAME_SAMPLES
        self.metrics.queue_depth.labels("diarizer").set(waiting)
        words: dict[str, Any] = {} if state is None else {"state": state, "reason": reason}
        degraded = [s for s in sessions if s.state is DiarizerState.DEGRADED]
        if state == "ready" and degraded:
            why = f"{len(degraded)} session(s) degraded: {degraded[0].reason}"
            words.update(state="degraded", reason=why)
        if state == "loading" and progress:
            words["reason"] = f"loading ({progress})"
        self.status.update_diarizer(
            **words, device=figures.get("device"), runtime=figures.get("runtime"),
            precision=figures.get("precision"), model=figures.get("model"), progress=progress,
            sessions=sum(s.admitted for s in sessions), **fields, **self._volatile,
        )


__all__ = ["EngineReport"]
