"""Whether local diarization runs at all, and how many sessions it takes (sans-I/O).

`decide_availability(settings)` is the one decision whether this daemon runs a diarizer worker:
the engine makes it once, at construction, and the app reads it (`engine.availability`) for its
start-up lines and checks. Module specs only: cheap, no torch or NeMo import.

`Capacity` turns the worker's READY measurements into how many sessions it takes:
sessions are admitted while `model + step_peak + n * per_session <= budget`, per_session =
max(measured state, EDGE_DIARIZATION_SESSION_MB), and while `n * RTF <= EDGE_DIARIZATION_MAX_RTF`
(one worker steps every session in turn: past that all would fall behind). The RTF is the
warm-up's at first, then the live one, so a device merely busy during warm-up admits more later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from edge.device import MB
from edge.diarization import nemo_diarization_available, worker_runtime_available
from edge.plan import local_diarizer_used
from edge.settings import Settings


@dataclass(frozen=True)
class Availability:
    """`state`: "available" (a worker can be started), "disabled" (switched off: no message, by
    the seed contract) or "unavailable" (`reason` says why). `nemo_error`: why NeMo itself
    cannot be imported (None when it can): an available diarizer then runs the ONNX export."""

    state: Literal["available", "disabled", "unavailable"]
    reason: str | None = None
    nemo_error: str | None = None


def decide_availability(settings: Settings) -> Availability:
    """Whether a local diarizer worker can run with these settings and installed packages."""
    if not settings.stt_enable_nemo_diarization_fallback:
        return Availability("disabled", "local diarization is off (STT_ENABLE_NEMO_DIARIZATION_FALLBACK)")
    if not local_diarizer_used(settings):  # the session plan never opens one
        return Availability("disabled", "local diarization is off "
                            f"(EDGE_STT_DIARIZATION={settings.edge_stt_diarization})")
    nemo_error = nemo_diarization_available()[1]
    ok, err = worker_runtime_available(settings.edge_diarization_runtime)
    if not ok:
        return Availability("unavailable", str(err), nemo_error)
    return Availability("available", None, nemo_error)


def nemo_check(reason: str) -> str:
    """The `nemo` check's value for an unavailable diarizer (the seed's wording)."""
    return reason if reason.startswith("NeMo not available") else f"NeMo not available: {reason}"


class Capacity:
    """How many sessions the worker takes: min(memory, compute) (module docstring).

    `budget`: EDGE_DIARIZATION_MEMORY_MB in bytes; `session_mb`: EDGE_DIARIZATION_SESSION_MB;
    `max_rtf`: EDGE_DIARIZATION_MAX_RTF (0: no compute limit). `figures` holds the worker's
    READY measurements plus what is derived from them (for the status and the logs).
    """

    def __init__(self, budget: int, session_mb: int, max_rtf: float) -> None:
        self.budget, self.session_mb, self.max_rtf = budget, session_mb, max_rtf
        self.figures: dict[str, Any] = {}
        self.sessions = 0

    def measured(self, fig: dict[str, Any]) -> str | None:
        """A (re)loaded worker's READY figures. Returns why no session fits the memory budget,
        or None."""
        self.figures = dict(fig)
        per_session = max(int(fig["session_bytes"]), self.session_mb * MB)
        fixed = int(fig["model_rss"]) + int(fig["step_peak"])
        memory = max(0, (self.budget - fixed) // per_session)
        self.figures.update(per_session=per_session, memory_capacity=memory)
        self.rtf(fig["rtf"])
        if memory == 0:
            return (f"model needs {fixed // MB} MB + {per_session // MB} MB per session: "
                    f"EDGE_DIARIZATION_MEMORY_MB={self.budget // MB} fits no session")
        return None

    def rtf(self, rtf: float) -> bool:
        """A newer RTF estimate (per session). Returns whether the capacity grew."""
        f = self.figures
        compute = max(1, int(self.max_rtf / rtf)) if rtf > 0 and self.max_rtf > 0 else f["memory_capacity"]
        f.update(compute_capacity=compute, rtf_estimate=round(rtf, 4))
        before, self.sessions = self.sessions, min(f["memory_capacity"], compute)
        return self.sessions > before

    def refusal(self) -> str:
        """Why a session over capacity is refused, naming the limit that binds."""
        f = self.figures
        if f["memory_capacity"] <= f["compute_capacity"]:
            why = (f"{self.sessions} session(s) of {f['per_session'] // MB} MB fit "
                   f"EDGE_DIARIZATION_MEMORY_MB={self.budget // MB}")
        else:
            why = (f"{self.sessions} session(s) keep up in real time on {f['device']} "
                   f"(RTF {f['rtf_estimate']:.3f} per session)")
        return f"local diarization at capacity: {why}"


__all__ = ["Availability", "Capacity", "decide_availability", "nemo_check"]
