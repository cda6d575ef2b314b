"""The bench-only producer, registered as `bench` by bench.relay_host (never by the relay itself).

It answers like a model streaming text, and stamps each piece: {"type":"text-start","id":"t0"}
at offset 0, then `count` text deltas {"type":"text-delta","id":"t0","delta":"<seq>:<us>"}, seq
being the chunk's offset and us the microseconds since the bench epoch when it was made. Readers in
other processes check every chunk against its offset and measure latency from the stamp.

Options (all strings, like Start's options):
- `count`: text deltas to yield after the text-start (default 1000);
- `rate`: chunks per second, 0 = as fast as possible, returning to the event loop every 64 chunks
  like the echo producer (default 0). Paced streams start at a phase taken from the stream id, so
  a thousand of them do not tick in lockstep. One pacer wakes every paced stream that is due, in
  1 ms steps, as Node's timers do for the peer's producer (and as one epoll wakes many ready
  model connections), rather than one asyncio timer per chunk;
- `hold_s`: after the last chunk, keep the stream live this long (default 0); Stop ends it;
- `gate`: "1" = wait for the host's release (SIGUSR1) before the first chunk, so every reader is
  attached before any chunk exists;
- `epoch_ns`: the bench epoch (CLOCK_MONOTONIC ns) the stamps count from.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Mapping

from relay.domain.errors import InvalidArgument
from relay.domain.model import JsonObject
from relay.producers import ProduceRequest

_BURST = 64
_OPTIONS = {"count", "rate", "hold_s", "gate", "epoch_ns"}


class Pacer:
    """Wakes sleepers at their due time rounded up to the next millisecond, all due ones at once."""

    def __init__(self) -> None:
        self._due: dict[int, list[asyncio.Future[None]]] = {}
        self._ticking: asyncio.Task[None] | None = None

    async def until(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        if when <= loop.time():
            return
        waiter = loop.create_future()
        self._due.setdefault(math.ceil(when * 1000), []).append(waiter)
        if self._ticking is None or self._ticking.done():
            self._ticking = asyncio.create_task(self._tick())
        await waiter

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            await asyncio.sleep(max(0.0, min(self._due) / 1000 - loop.time()))
            now = loop.time() * 1000
            for slot in [slot for slot in self._due if slot <= now]:
                for waiter in self._due.pop(slot):
                    if not waiter.done():
                        waiter.set_result(None)


class BenchProducer:
    def __init__(self) -> None:
        self._gate = asyncio.Event()
        self._pacer = Pacer()

    def release(self) -> None:
        """Lets every gated stream that has started so far begin; later ones wait again."""
        gate, self._gate = self._gate, asyncio.Event()
        gate.set()

    def check_options(self, options: Mapping[str, str]) -> None:
        self._parse(options)

    @staticmethod
    def _parse(options: Mapping[str, str]) -> tuple[int, float, float, bool, int]:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise InvalidArgument(f"bench producer: unknown options {sorted(unknown)}")
        try:
            count = int(options.get("count", "1000"))
            rate = float(options.get("rate", "0"))
            hold = float(options.get("hold_s", "0"))
            epoch = int(options.get("epoch_ns", "0"))
        except ValueError as exc:
            raise InvalidArgument(f"bench producer: {exc}") from None
        return count, rate, hold, options.get("gate", "0") == "1", epoch

    async def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
        count, rate, hold, gated, epoch = self._parse(request.options)
        if gated:
            await self._gate.wait()
        clock = time.monotonic_ns
        yield {"type": "text-start", "id": "t0"}
        if rate > 0:
            loop = asyncio.get_running_loop()
            interval = 1 / rate
            start = loop.time() + interval * int(request.stream_id[:8], 16) / 2**32
            for seq in range(1, count + 1):
                await self._pacer.until(start + seq * interval)
                yield {
                    "type": "text-delta",
                    "id": "t0",
                    "delta": f"{seq}:{(clock() - epoch) // 1000}",
                }
        else:
            for seq in range(1, count + 1):
                if seq % _BURST == 0:
                    await asyncio.sleep(0)
                yield {
                    "type": "text-delta",
                    "id": "t0",
                    "delta": f"{seq}:{(clock() - epoch) // 1000}",
                }
        if hold > 0:
            await asyncio.sleep(hold)
