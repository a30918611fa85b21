"""Driving an upstream run from a scripted source: the tests write their audio as an async
iterator of blocks and `FLUSH` markers (pacing it with awaits where they need to), and `drive`
makes the calls a channel makes (`push`, `flush`, `end`) in that order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from edge.clock import AudioBlock
from edge.stt.base import UpstreamRun


class _Flush:
    def __repr__(self) -> str:
        return "FLUSH"


FLUSH: Final = _Flush()  # a Finalize at this point of the scripted audio
AudioItem = AudioBlock | _Flush


async def drive(run: UpstreamRun, audio: AsyncIterator[AudioItem]) -> None:
    """Push `audio` into `run` (FLUSH -> `flush()`), then `end()` — also when the script fails,
    so the run ends and the failure surfaces from this coroutine."""
    try:
        async for item in audio:
            if isinstance(item, AudioBlock):
                run.push(item)
            else:
                run.flush()
    finally:
        run.end()
