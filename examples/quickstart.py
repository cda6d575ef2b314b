"""Start an answer, read some, disconnect, re-attach where we left off, then stop another.

Run `make run` in one terminal, then: .venv/bin/python examples/quickstart.py [host:port]
"""

import asyncio
import json
import sys

from relay.client import RelayClient
from relay.domain.model import ChunkBatch, StreamEnd, UIMessage


async def main(target: str) -> None:
    async with RelayClient(target) as relay:
        question = UIMessage("u1", "user", [{"type": "text", "text": "tell me about relays"}])
        started = await relay.start(
            "demo-chat", [question], options={"chunks": "40", "delay_ms": "10"}
        )
        print("started stream", started.stream_id)

        # Read a few chunks, then drop the connection, as a closed tab would.
        seen = 0
        async for event in relay.attach(stream_id=started.stream_id, max_batch=1):
            assert isinstance(event, ChunkBatch)
            seen += len(event.chunks)
            if seen == 5:
                break
        print("disconnected after", seen, "chunks; the producer goes on")

        # Re-attach right after the last chunk we saw: no gap, no duplicate.
        async for event in relay.attach(stream_id=started.stream_id, from_offset=seen):
            if isinstance(event, StreamEnd):
                print("ended:", event.state.value, "after", event.final_offset, "chunks")
        messages = await relay.list_messages("demo-chat")
        print("persisted:", [m.role for m in messages], repr(messages[-1].parts[-1]["text"][:40]))

        # A second question, stopped explicitly by the user half-way.
        again = UIMessage("u2", "user", [{"type": "text", "text": "and again"}])
        second = await relay.start(
            "demo-chat", [again], options={"chunks": "1000", "delay_ms": "10"}
        )
        async for event in relay.attach(chat_id="demo-chat"):
            assert isinstance(event, ChunkBatch)
            if json.loads(event.chunks[-1])["type"] == "text-delta":
                break
        stopped = await relay.stop("demo-chat", second.stream_id)
        assert stopped.end is not None
        print("stop:", stopped.outcome.value, "at offset", stopped.end.final_offset)
        print("active stream now:", await relay.get_active("demo-chat"))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
