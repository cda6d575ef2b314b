"""The bench-only producer, registered as `bench` by bench.relay_host (never by the relay itself).

It answers like a model streaming text, and stamps each piece: {"type":"text-start","id":"t0"}
at offset 0, then `count` text deltas {"type":"text-delta","id":"t0","delta":"<seq>:<us>"}, seq
being the chunk's offset and us the microseconds since the bench epoch when it was made. Readers in
other processes check every chunk against its offset and measure latency from the stamp.

Options (all strings, like Start's options):
- `count`: text deltas to yield after the text-start (default 1000);
- `rate`: chunks per second, 0 = as fast as possible, returning to the event loop every 64 chunks
  like the echo producer (default 0). Paced streams start at a phase taken from the stream id, so
  a thousand of them do not tick in lockstep;
- `hold_s`: after the last chunk, keep the stream live this long (default 0); Stop ends it;
- `gate`: "1" = wait for the host's release (SIGUSR1) before the first chunk, so every reader is
  attached before any chunk exists;
- `epoch_ns`: the bench epoch (CLOCK_MONOTONIC ns) the stamps count from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping

from relay.errors import InvalidArgument
from relay.model import JsonObject
from relay.producers import ProduceRequest

_BURST = 64
_OPTIONS = {"count", "rate", "hold_s", "gate", "epoch_ns"}


class BenchProducer:
    def __init__(self) -> None:
        self._gate = asyncio.Event()

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
                delay = start + seq * interval - loop.time()
                await asyncio.sleep(delay if delay > 0 else 0)
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
