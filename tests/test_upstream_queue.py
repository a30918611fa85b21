"""The upstream queue: tiny blocks joined, bounded in seconds, the oldest dropped on overflow."""

from __future__ import annotations

from edge.clock import MIN_BLOCK_SAMPLES, AudioBlock
from edge.stt.base import FLUSH, AudioItem
from edge.upstream_queue import UpstreamQueue


def block(start: int, samples: int) -> AudioBlock:
    """`samples` of audio at `start` whose bytes tell blocks apart."""
    return AudioBlock(start, bytes([start % 251]) * (2 * samples))


async def drain(q: UpstreamQueue) -> list[AudioItem]:
    return [item async for item in q.items()]


async def test_blocks_under_20_ms_are_joined_with_the_next() -> None:
    q = UpstreamQueue()
    first, second = block(0, 100), block(100, 100)
    assert q.push(first) == [] and q.push(second) == []  # 200 samples: still held
    assert q.push(block(200, MIN_BLOCK_SAMPLES)) == []
    assert q.end() == []
    items = await drain(q)
    assert len(items) == 1
    joined = items[0]
    assert isinstance(joined, AudioBlock)
    assert (joined.start, joined.samples) == (0, 200 + MIN_BLOCK_SAMPLES)
    assert joined.pcm == first.pcm + second.pcm + block(200, MIN_BLOCK_SAMPLES).pcm


async def test_flush_and_end_send_what_is_held_first() -> None:
    q = UpstreamQueue()
    q.push(block(0, 160))  # 10 ms: held
    q.flush()
    q.push(block(160, 80))
    q.end()
    items = await drain(q)
    assert [(i.start, i.samples) if isinstance(i, AudioBlock) else i for i in items] == [
        (0, 160), FLUSH, (160, 80)]


async def test_overflow_drops_the_oldest_blocks_and_returns_them() -> None:
    q = UpstreamQueue(seconds=0.1)  # room for 5 blocks of 20 ms
    blocks = [block(i * MIN_BLOCK_SAMPLES, MIN_BLOCK_SAMPLES) for i in range(7)]
    dropped = [d for b in blocks for d in q.push(b)]
    assert dropped == blocks[:2]
    assert q.end() == [blocks[2]]  # the end of audio also makes room
    assert await drain(q) == blocks[3:]


async def test_a_dropped_flush_is_not_reported_as_lost_audio() -> None:
    q = UpstreamQueue(seconds=0.1)
    q.flush()  # FLUSH is the oldest item
    blocks = [block(i * MIN_BLOCK_SAMPLES, MIN_BLOCK_SAMPLES) for i in range(5)]
    assert [d for b in blocks for d in q.push(b)] == []
    q.end()
    assert await drain(q) == blocks[1:]
