"""SharedAttach: Attach's interface for many readers over one AttachMany call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.client.errors import Cancelled, NotFound, OutOfRange
from relay.client.shared_attach import SharedAttach
from relay.domain.model import ChunkBatch, StreamEnd, StreamState, dump_json
from tests.conftest import Env, eventually, text_chunks, user


@pytest.fixture
async def shared(env: Env) -> AsyncIterator[SharedAttach]:
    reads = SharedAttach(env.client)
    yield reads
    await reads.close()


async def read_all(events: AsyncIterator[ChunkBatch | StreamEnd]) -> tuple[list[str], StreamEnd]:
    chunks: list[str] = []
    async for event in events:
        if isinstance(event, StreamEnd):
            return chunks, event
        assert event.first_offset == len(chunks), "a gap or a repeat"
        chunks.extend(event.chunks)
    raise AssertionError("no end")


async def test_readers_of_several_streams_share_one_call(env: Env, shared: SharedAttach) -> None:
    starts = [
        await env.client.start(f"chat-{i}", [user("hi")], producer="scripted") for i in range(3)
    ]
    attached = [await shared.open_attach(stream_id=s.stream_id) for s in starts]
    late = await shared.open_attach(chat_id="chat-1", from_offset=0)
    assert [a.stream_id for a in attached] == [s.stream_id for s in starts]
    assert late.stream_id == starts[1].stream_id
    assert env.relay.stats().readers == 4
    sent = [text_chunks(n, f"m{n}") for n in (3, 5, 7)]
    for start, chunks in zip(starts, sent, strict=True):
        env.scripted.script(start.stream_id).put(*chunks, None)
    for a, chunks in zip(attached, sent, strict=True):
        received, end = await read_all(a.events)
        assert received == [dump_json(c) for c in chunks]
        assert end.state is StreamState.COMPLETED and end.final_offset == len(chunks)
    assert (await read_all(late.events))[0] == [dump_json(c) for c in sent[1]]
    await eventually(lambda: env.relay.stats().readers == 0)


async def test_a_refused_reader_raises_attachs_status(env: Env, shared: SharedAttach) -> None:
    with pytest.raises(NotFound):
        await shared.open_attach(stream_id="f" * 32)
    with pytest.raises(NotFound):
        await shared.open_attach(chat_id="no-such-chat")
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    with pytest.raises(OutOfRange):
        await shared.open_attach(stream_id=started.stream_id, from_offset=5)
    attached = await shared.open_attach(stream_id=started.stream_id)  # the call goes on
    env.scripted.script(started.stream_id).put(*text_chunks(1), None)
    assert (await read_all(attached.events))[1].final_offset == 4


async def test_closing_a_reader_ends_only_it(env: Env, shared: SharedAttach) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    stream = env.relay.streams[started.stream_id]
    gone = await shared.open_attach(stream_id=started.stream_id)
    staying = await shared.open_attach(stream_id=started.stream_id)
    await eventually(lambda: stream.readers == 2)
    await gone.events.aclose()  # the browser went away
    await eventually(lambda: stream.readers == 1)
    script = env.scripted.script(started.stream_id)
    assert not script.cancelled.is_set()
    script.put(*text_chunks(2), None)
    chunks, end = await read_all(staying.events)
    assert len(chunks) == 5 and end.state is StreamState.COMPLETED


async def test_a_lagging_reader_is_paused_then_resumes_where_it_stopped(env: Env) -> None:
    shared = SharedAttach(env.client, pause_after=1)
    try:
        started = await env.client.start("chat-1", [user("hi")], producer="scripted")
        stream = env.relay.streams[started.stream_id]
        script = env.scripted.script(started.stream_id)
        attached = await shared.open_attach(stream_id=started.stream_id)
        sent = text_chunks(6)
        script.put(sent[0])
        # Nobody reads: one batch waiting is the limit, so the reader leaves the relay...
        await eventually(lambda: len(stream.chunks) == 1 and stream.readers == 0)
        script.put(*sent[1:], None)
        await stream.wait_ended()
        # ...and comes back from offset 1 once its consumer has read what was waiting.
        chunks, end = await read_all(attached.events)
    finally:
        await shared.close()
    assert chunks == [dump_json(c) for c in sent]
    assert end.final_offset == len(sent)


async def test_readers_learn_that_the_call_broke(env: Env, shared: SharedAttach) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    attached = await shared.open_attach(stream_id=started.stream_id)
    await shared.close()  # as a relay going away would: the call ends under the reader
    with pytest.raises(Cancelled):
        await read_all(attached.events)
    again = await shared.open_attach(stream_id=started.stream_id)  # a new call is dialled
    env.scripted.script(started.stream_id).put(*text_chunks(1), None)
    assert (await read_all(again.events))[1].state is StreamState.COMPLETED


async def test_a_paused_reader_whose_stream_is_gone_gets_an_error_not_silence(env: Env) -> None:
    shared = SharedAttach(env.client, pause_after=1)
    try:
        started = await env.client.start("chat-1", [user("hi")], producer="scripted")
        stream = env.relay.streams[started.stream_id]
        attached = await shared.open_attach(stream_id=started.stream_id)
        env.scripted.script(started.stream_id).put(*text_chunks(3), None)
        await eventually(lambda: stream.readers == 0)  # paused with its first batch waiting
        await stream.wait_ended()
        env.clock.now += 601
        assert await env.relay.sweep() == [started.stream_id]  # retention passed meanwhile
        events = aiter(attached.events)
        first = await anext(events)
        assert isinstance(first, ChunkBatch) and first.first_offset == 0
        with pytest.raises(NotFound):
            await anext(events)  # coming back finds the stream gone: said, not hidden
    finally:
        await shared.close()
