"""A channel's queue of audio for its upstream: bounded, in seconds, dropping the oldest.

The channel puts decoded blocks in as they arrive; its upstream task reads them (`items()`).
The bound is `UPSTREAM_QUEUE_S` of audio: the queue counts blocks, so blocks under
`MIN_BLOCK_SAMPLES` (20 ms) are held back and joined with the next, which makes the bound mean
seconds whatever the client's frame size. Overflow policy: when the upstream task stalls the
OLDEST item is dropped and the newest kept (live transcription wants the present); every put
returns the blocks it dropped, for the channel to count and report.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from edge.clock import MIN_BLOCK_S, MIN_BLOCK_SAMPLES, AudioBlock
from edge.stt.base import FLUSH, AudioItem

UPSTREAM_QUEUE_S = 10.0


class UpstreamQueue:
    """Audio blocks, FLUSH markers and one end of audio, for one upstream stream."""

    def __init__(self, seconds: float = UPSTREAM_QUEUE_S) -> None:
        # None is the end of audio.
        # Every block holds at least MIN_BLOCK_S, so this many hold at least `seconds`.
        self._queue: asyncio.Queue[AudioItem | None] = asyncio.Queue(
            max(4, round(seconds / MIN_BLOCK_S)))
        self._held: AudioBlock | None = None  # audio under MIN_BLOCK_SAMPLES, not yet queued

    def push(self, block: AudioBlock) -> list[AudioBlock]:
        """Queue `block` after any audio held back (itself held back while under 20 ms).
        Returns the blocks dropped to make room (empty when none)."""
        if self._held is not None:
            block = AudioBlock(self._held.start, self._held.pcm + block.pcm)
            self._held = None
        if block.samples < MIN_BLOCK_SAMPLES:
            self._held = block
            return []
        return self._put(block)

    def flush(self) -> list[AudioBlock]:
        """Queue the audio held back, then FLUSH (Deepgram's Finalize). Returns what was dropped."""
        return self._put_held() + self._put(FLUSH)

    def end(self) -> list[AudioBlock]:
        """Queue the audio held back, then the end of audio: `items()` stops there. Returns
        what was dropped."""
        return self._put_held() + self._put(None)

    async def items(self) -> AsyncIterator[AudioItem]:
        """The queued blocks and FLUSH markers in order, until the end of audio."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def _put_held(self) -> list[AudioBlock]:
        held, self._held = self._held, None
        return [] if held is None else self._put(held)

    def _put(self, item: AudioItem | None) -> list[AudioBlock]:
        try:
            self._queue.put_nowait(item)
            return []
        except asyncio.QueueFull:
            # Overflow policy: drop the oldest, keep the newest (see module doc).
            dropped = self._queue.get_nowait()
            self._queue.put_nowait(item)
            return [dropped] if isinstance(dropped, AudioBlock) else []


__all__ = ["UPSTREAM_QUEUE_S", "UpstreamQueue"]
