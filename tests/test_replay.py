"""Compacted and part-safe replay (relay.domain.replay): what a resume sends parses from an empty
message into the message the plain chunks build, with SSE ids that still name real chunks; and
every reader of a stream that did not complete gets exactly one terminal chunk."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway.app import GatewaySettings, create_app
from relay.client import ManyReaders
from relay.client.errors import Unavailable
from relay.domain.assembler import MessageAssembler
from relay.domain.model import Attached, ChunkBatch, JsonObject, ReplayMode, StreamEnd, dump_json
from relay.domain.replay import MERGED_MAX_CHARS, Compaction, compact
from relay.domain.stream import Stream
from relay.producers import ProducerFailed
from tests.conftest import Env, eventually, text_chunks
from tests.test_gateway import CHECKED, JSON_TYPE, Gateway, serve

# A tool call, a reasoning part and a text part, with deltas of each.
RICH: list[JsonObject] = [
    {"type": "start", "messageId": "m1"},
    {"type": "start-step"},
    {"type": "reasoning-start", "id": "r"},
    *({"type": "reasoning-delta", "id": "r", "delta": f"think{i} "} for i in range(5)),
    {"type": "reasoning-end", "id": "r"},
    {"type": "tool-input-start", "toolCallId": "c1", "toolName": "search"},
    *({"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": p} for p in '{"q":"ab"}'),
    {
        "type": "tool-input-available",
        "toolCallId": "c1",
        "toolName": "search",
        "input": {"q": "ab"},
    },
    {"type": "tool-output-available", "toolCallId": "c1", "output": {"hits": 2}},
    {"type": "text-start", "id": "t"},
    *({"type": "text-delta", "id": "t", "delta": f"w{i} "} for i in range(8)),
    {"type": "text-end", "id": "t"},
    {"type": "finish-step"},
    {"type": "finish", "finishReason": "stop"},
]


def encoded(chunks: list[JsonObject]) -> list[str]:
    return [dump_json(c) for c in chunks]


def message_of(chunks: list[str]) -> JsonObject | None:
    """The message a client builds from `chunks` starting from an empty message."""
    assembler = MessageAssembler(fallback_id="none")
    for chunk in chunks:
        assembler.add(json.loads(chunk))
    message = assembler.message()
    return None if message is None else message.to_json()


def test_compact_merges_each_run_of_deltas_and_names_the_last_chunk_it_covers() -> None:
    chunks = encoded(RICH)
    out, offsets = compact(chunks, len(chunks))

    types = [json.loads(c)["type"] for c in out]
    assert types.count("reasoning-delta") == types.count("text-delta") == 1
    assert types.count("tool-input-delta") == 1
    assert len(out) == len(chunks) - 4 - (len('{"q":"ab"}') - 1) - 7
    merged = [json.loads(c) for c in out if json.loads(c)["type"] == "text-delta"]
    assert merged == [
        {"type": "text-delta", "id": "t", "delta": "".join(f"w{i} " for i in range(8))}
    ]
    # Offsets rise, end at the last chunk, and a merged delta names the last delta it covers.
    assert offsets == sorted(set(offsets)) and offsets[-1] == len(chunks) - 1
    text_end = next(i for i, c in enumerate(RICH) if c["type"] == "text-end")
    assert offsets[types.index("text-delta")] == text_end - 1
    # Chunks that are not merged are sent byte for byte as stored.
    for chunk, offset in zip(out, offsets, strict=True):
        if json.loads(chunk)["type"] not in ("text-delta", "reasoning-delta", "tool-input-delta"):
            assert chunk == chunks[offset]
    assert message_of(out) == message_of(chunks)


def test_compact_leaves_alone_deltas_with_more_fields_and_bounds_a_merged_delta() -> None:
    extra = {"type": "text-delta", "id": "t", "delta": "x", "providerMetadata": {"a": {"b": 1}}}
    plain = [{"type": "text-delta", "id": "t", "delta": "y"}] * 2
    chunks = encoded([{"type": "text-start", "id": "t"}, *plain, extra, *plain])
    out, offsets = compact(chunks, len(chunks))
    assert [json.loads(c).get("delta") for c in out] == [None, "yy", "x", "yy"]
    assert offsets == [0, 2, 3, 5]

    big = "z" * (MERGED_MAX_CHARS // 2 + 1)
    chunks = encoded([{"type": "text-delta", "id": "t", "delta": big}] * 3)
    out, _ = compact(chunks, len(chunks))
    assert len(out) == 3  # two would pass the bound
    small = encoded([{"type": "text-delta", "id": "t", "delta": "a"}] * 3)
    assert len(compact(small, 3)[0]) == 1


def test_a_single_delta_run_and_other_parts_interleaved_stay_as_stored() -> None:
    chunks = encoded(
        [
            {"type": "text-delta", "id": "a", "delta": "1"},
            {"type": "text-delta", "id": "b", "delta": "2"},
            {"type": "text-delta", "id": "a", "delta": "3"},
        ]
    )
    out, offsets = compact(chunks, 3)
    assert out == chunks and offsets == [0, 1, 2]
    assert compact(chunks, 0) == ([], [])


# A well-formed answer: parts opened, streamed (interleaved) and maybe closed, in any order.
@st.composite
def answers(draw: st.DrawFn) -> list[JsonObject]:
    chunks: list[JsonObject] = [{"type": "start", "messageId": "m"}, {"type": "start-step"}]
    open_parts: list[tuple[str, str]] = []
    for n in range(draw(st.integers(0, 40))):
        action = draw(st.sampled_from(["open", "delta", "delta", "delta", "close", "other"]))
        if action == "open" or (action in ("delta", "close") and not open_parts):
            kind = draw(st.sampled_from(["text", "reasoning", "tool"]))
            part = f"{kind}{n}"
            if kind == "tool":
                chunks.append({"type": "tool-input-start", "toolCallId": part, "toolName": "f"})
            else:
                chunks.append({"type": f"{kind}-start", "id": part})
            open_parts.append((kind, part))
        elif action == "delta":
            kind, part = draw(st.sampled_from(open_parts))
            text = draw(st.text(max_size=5))
            if kind == "tool":
                chunks.append(
                    {"type": "tool-input-delta", "toolCallId": part, "inputTextDelta": text}
                )
            elif draw(st.booleans()):
                chunks.append({"type": f"{kind}-delta", "id": part, "delta": text})
            else:  # a delta with provider metadata: never merged
                meta = {"p": {"n": n}}
                chunks.append(
                    {"type": f"{kind}-delta", "id": part, "delta": text, "providerMetadata": meta}
                )
        elif action == "close":
            kind, part = open_parts.pop(draw(st.integers(0, len(open_parts) - 1)))
            if kind == "tool":
                chunks.append(
                    {
                        "type": "tool-input-available",
                        "toolCallId": part,
                        "toolName": "f",
                        "input": {},
                    }
                )
            else:
                chunks.append({"type": f"{kind}-end", "id": part})
        else:
            chunks.append({"type": "data-note", "data": n})
    return chunks


@hypothesis_settings(max_examples=300, deadline=None)
@given(answers(), st.data())
def test_any_snapshot_then_the_rest_builds_the_plain_message(
    answer: list[JsonObject], data: st.DataObject
) -> None:
    chunks = encoded(answer)
    whole = message_of(chunks)
    assert message_of(compact(chunks, len(chunks))[0]) == whole
    k = data.draw(st.integers(0, len(chunks)))
    snapshot, offsets = compact(chunks, k)
    assert message_of([*snapshot, *chunks[k:]]) == whole
    assert offsets == sorted(set(offsets))
    assert offsets[-1:] == ([k - 1] if k else [])
    # A stream's compaction, extended as chunks come and asked for any prefix on the way, gives
    # what compacting that prefix at once gives.
    compaction, upto = Compaction(), 0
    for cut in sorted(data.draw(st.lists(st.integers(0, len(chunks)), max_size=4))):
        compaction.extend(chunks, cut)
        upto = cut
        end = data.draw(st.integers(0, upto))
        got = [b for b in compaction.batches(chunks, end, 3, 1 << 30)]
        flat = [c for b in got for c in b.chunks], [o for b in got for o in b.offsets or []]
        assert flat == compact(chunks, end)
        assert [b.first_offset for b in got[1:]] == [b.next_offset for b in got[:-1]]


def ids_and_chunks(events: list[ChunkBatch | StreamEnd]) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    chunks: list[str] = []
    for event in events:
        if isinstance(event, ChunkBatch):
            ids.extend(event.offset_of(i) for i in range(len(event.chunks)))
            chunks.extend(event.chunks)
    return ids, chunks


def test_batches_of_a_compacted_replay_keep_their_offsets_and_bounds() -> None:
    chunks = encoded(RICH)
    stream = Stream("s" * 32, "c", 0.0)
    for chunk in chunks:
        stream.append(chunk, len(chunk))
    lazy, resume_at = stream.prefix(0, ReplayMode.COMPACT, max_batch=3)
    batches = list(lazy)
    assert resume_at == len(chunks)
    assert all(len(b.chunks) <= 3 for b in batches)
    assert [b.first_offset for b in batches[1:]] == [b.next_offset for b in batches[:-1]]
    ids, sent = ids_and_chunks(list(batches))
    assert message_of(sent) == message_of(chunks) and ids[-1] == len(chunks) - 1
    # Part-safe from 0 sends nothing before the stored chunks; exact never does.
    for offset, mode, resume_at in ((0, ReplayMode.PART_SAFE, 0), (7, ReplayMode.EXACT, 7)):
        lazy, at = stream.prefix(offset, mode, 10)
        assert (list(lazy), at) == ([], resume_at)
    # The compaction it keeps for later replays is counted: merged text beyond the chunks.
    assert stream.replay_bytes > len("".join(f"w{i} " for i in range(8)))


@pytest.mark.parametrize("replay", [ReplayMode.PART_SAFE, ReplayMode.COMPACT])
async def test_attach_mid_part_then_live_builds_the_whole_message(
    env: Env, replay: ReplayMode
) -> None:
    started = await env.client.start("chat-1", producer="scripted")
    script = env.scripted.script(started.stream_id)
    head, tail = RICH[:-6], RICH[-6:]  # cut inside the text part
    script.put(*head)
    await eventually(lambda: len(env.relay.streams[started.stream_id].chunks) == len(head))

    k = len(head) - 2  # the last two text deltas come after the resume point
    events: list[ChunkBatch | StreamEnd] = []
    async for event in env.client.attach(stream_id=started.stream_id, from_offset=k, replay=replay):
        events.append(event)
        if isinstance(event, ChunkBatch) and event.next_offset == len(head):
            script.put(*tail, None)
    assert isinstance(events[-1], StreamEnd)
    ids, chunks = ids_and_chunks(events)
    assert message_of(chunks) == message_of(encoded(RICH))
    assert json.loads(chunks[0])["type"] == "start"  # never a bare delta first
    assert ids == sorted(set(ids)) and ids[-1] == len(RICH) - 1
    stored = encoded(RICH)
    if replay is ReplayMode.PART_SAFE:  # the snapshot covers [0, k); then every chunk as stored
        cut = ids.index(k)
        assert ids[cut:] == list(range(k, len(RICH))) and chunks[cut:] == stored[k:]
        assert ids[cut - 1] == k - 1
    else:  # what the stream held is compacted; the tail came live, one by one
        assert len(chunks) < len(RICH) - 10
        assert chunks[-len(tail) :] == stored[-len(tail) :]


async def test_attach_many_replays_part_safe_per_subscription(env: Env) -> None:
    started = await env.client.start("chat-1", producer="scripted")
    env.scripted.script(started.stream_id).put(*RICH, None)
    await env.relay.streams[started.stream_id].wait_ended()

    readers: ManyReaders
    events: dict[int, list[ChunkBatch | StreamEnd]] = {1: [], 2: [], 3: []}
    async with env.client.attach_many() as readers:
        readers.subscribe(
            1, stream_id=started.stream_id, from_offset=9, replay=ReplayMode.PART_SAFE
        )
        readers.subscribe(2, stream_id=started.stream_id, replay=ReplayMode.COMPACT)
        readers.subscribe(3, stream_id=started.stream_id, from_offset=9)
        readers.done_subscribing()
        async for tag, event in readers:
            if isinstance(event, ChunkBatch | StreamEnd):
                events[tag].append(event)
    whole = message_of(encoded(RICH))
    for tag in (1, 2):
        ids, chunks = ids_and_chunks(events[tag])
        assert message_of(chunks) == whole, tag
        assert ids == sorted(set(ids)) and ids[-1] == len(RICH) - 1
    ids, chunks = ids_and_chunks(events[3])  # exact: from offset 9 as stored
    assert ids == list(range(9, len(RICH))) and chunks == encoded(RICH)[9:]
    assert len(events[2]) < len(events[1])  # compacted: fewer chunks in fewer batches


# -- through the gateway -------------------------------------------------------------------------


@pytest.fixture(params=["shared", "per-request"])
async def gw(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """The gateway with its defaults (compacted resumes), reading the relay either way."""
    settings = GatewaySettings(relay_target=env.target, relay_reads=request.param)
    server, task, url = await serve(create_app(settings))
    async with httpx.AsyncClient(timeout=10, event_hooks=CHECKED) as http:
        yield Gateway(url, http, env)
    server.should_exit = True
    await task


async def test_the_resume_route_compacts_by_default_and_resumes_part_safe(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as first:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(30))
        for _ in range(33):
            await first.next()

        async with gw.open("GET", "/api/chat/chat-1/stream") as whole:
            events = [await whole.next() for _ in range(4)]
        assert [e.chunk["type"] for e in events] == [
            "start",
            "start-step",
            "text-start",
            "text-delta",
        ]
        assert [e.id for e in events] == [0, 1, 2, 32]  # the merged delta names the last one
        assert events[3].chunk["delta"] == "".join(f"w{i} " for i in range(30))

        # Last-Event-ID inside the text part: a snapshot up to it, then what follows.
        headers = {"last-event-id": "10"}
        path = "/api/chat/chat-1/stream?replay=plain"
        async with gw.open("GET", path, headers=headers) as after:
            events = [await after.next() for _ in range(4 + 22)]
        assert [e.chunk["type"] for e in events[:4]] == [
            "start",
            "start-step",
            "text-start",
            "text-delta",
        ]
        assert [e.id for e in events] == [0, 1, 2, *range(10, 33)]
        assert events[3].chunk["delta"] == "".join(f"w{i} " for i in range(8))

        bad = await gw.http.get(gw.url + "/api/chat/chat-1/stream?replay=fast")
        assert bad.status_code == 400 and "replay" in bad.json()["error"]["message"]
        script.put(None)


async def test_a_resume_of_a_live_answer_compacts_what_is_there_then_goes_on_live(
    gw: Gateway,
) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as first:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(5))
        for _ in range(8):
            await first.next()
        async with gw.open("GET", "/api/chat/chat-1/stream") as resumed:
            assert [(await resumed.next()).id for _ in range(4)] == [0, 1, 2, 7]
            script.put({"type": "text-delta", "id": "t", "delta": "live"})
            assert (await resumed.next()).id == 8
            script.put({"type": "text-end", "id": "t"}, {"type": "finish"}, None)
            rest = await resumed.rest()
        assert [e.id for e in rest] == [9, 10]


# -- one terminal chunk --------------------------------------------------------------------------


def terminal_chunks(events: list[Any]) -> list[str]:
    return [e.chunk["type"] for e in events if e.chunk["type"] in ("error", "abort")]


@pytest.mark.parametrize("own_error_chunk", [True, False])
async def test_a_failed_answer_ends_with_exactly_one_error_chunk(
    gw: Gateway, own_error_chunk: bool
) -> None:
    """The producer may report its failure as a chunk, or just raise: either way a reader (live,
    or resuming after the end) gets one `error` chunk, never the producer's and the gateway's."""
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as live:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(2))
        if own_error_chunk:
            script.put({"type": "error", "errorText": "the model broke"})
        script.put(ProducerFailed("the model broke"))
        events = await live.rest()
    assert terminal_chunks(events) == ["error"]
    assert events[-1].chunk == {"type": "error", "errorText": "the model broke"}
    end = await gw.env.relay.streams[stream_id].wait_ended()
    assert end.final_offset == 5 + own_error_chunk


async def test_an_answer_failed_by_a_relay_limit_ends_with_one_error_chunk(gw: Gateway) -> None:
    """The relay refuses a chunk (here: not an object): the stream fails there, and the reader
    gets the gateway's one `error` chunk with the reason."""
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as live:
        script = gw.env.scripted.script(next(iter(gw.env.relay.streams)))
        script.put(*text_chunks(1), ["not", "an", "object"])  # type: ignore[arg-type]
        events = await live.rest()
    assert terminal_chunks(events) == ["error"]
    assert "not an object" in events[-1].chunk["errorText"]


async def test_an_error_chunk_before_a_finish_is_still_the_only_one(gw: Gateway) -> None:
    """AI SDK streams send `finish` after an `error` chunk: the reader got its terminal chunk
    even though it was not the last, and the gateway adds none when the producer then fails."""
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as live:
        script = gw.env.scripted.script(next(iter(gw.env.relay.streams)))
        error = {"type": "error", "errorText": "the model broke"}
        script.put(*text_chunks(1), error, {"type": "finish"}, ProducerFailed("the model broke"))
        events = await live.rest()
    assert terminal_chunks(events) == ["error"]
    assert [e.chunk["type"] for e in events][-2:] == ["error", "finish"]


class RelayLostAtFirst:
    """The gateway's relay reads, with the first Attach accepted and then cut (UNAVAILABLE)
    before any event, as when the relay restarts right then."""

    def __init__(self, reads: Any) -> None:
        self.reads = reads
        self.calls: list[dict[str, Any]] = []

    async def open_attach(self, **request: Any) -> Attached:
        self.calls.append({k: v for k, v in request.items() if k != "subject"})
        attached: Attached = await self.reads.open_attach(**request)
        if len(self.calls) > 1:
            return attached
        await attached.events.aclose()

        async def cut() -> AsyncIterator[ChunkBatch | StreamEnd]:
            raise Unavailable("gone")
            yield  # an async generator that fails at its first read

        return Attached(attached.stream_id, cut())  # type: ignore[arg-type]


async def test_a_resume_whose_relay_goes_before_its_first_chunk_still_gets_its_snapshot(
    env: Env,
) -> None:
    """The gateway re-attaches a reader whose relay went away; before anything reached the
    client that must be the reader's own request again (a snapshot first), not an exact read
    from its Last-Event-ID, which would start with a bare delta."""
    app = create_app(GatewaySettings(relay_target=env.target, relay_reads="per-request"))
    server, task, url = await serve(app)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            gw = Gateway(url, http, env)
            body = gw.chat_body(producer="scripted")
            async with gw.open("POST", "/api/chat", json=body) as first:
                script = env.scripted.script(next(iter(env.relay.streams)))
                script.put(*text_chunks(10))
                for _ in range(13):
                    await first.next()
                gateway = app.state.gateway
                gateway.reads = reads = RelayLostAtFirst(gateway.reads)
                headers = {"last-event-id": "6"}
                async with gw.open("GET", "/api/chat/chat-1/stream", headers=headers) as resumed:
                    events = [await resumed.next() for _ in range(4)]
                script.put(None)
    finally:
        server.should_exit = True
        await task
    assert [call["replay"] for call in reads.calls] == [ReplayMode.COMPACT] * 2
    assert [e.chunk["type"] for e in events] == ["start", "start-step", "text-start", "text-delta"]


async def test_a_stopped_answer_ends_with_one_abort_even_if_the_producer_sent_one(
    gw: Gateway,
) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as live:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(1), {"type": "abort"})
        events = [await live.next() for _ in range(5)]
        stop = await gw.http.post(gw.url + "/api/chat/chat-1/stop", headers=JSON_TYPE)
        assert stop.json()["outcome"] == "stopped"
        events += await live.rest()
    assert terminal_chunks(events) == ["abort"]  # the producer's; the gateway adds none


async def test_a_stopped_answer_gets_one_abort_from_the_gateway(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as live:
        stream_id = next(iter(gw.env.relay.streams))
        gw.env.scripted.script(stream_id).put(*text_chunks(1))
        events = [await live.next() for _ in range(4)]
        stop = await gw.http.post(gw.url + "/api/chat/chat-1/stop", headers=JSON_TYPE)
        assert stop.json()["outcome"] == "stopped"
        events += await live.rest()
    assert terminal_chunks(events) == ["abort"]


async def test_an_interrupted_answer_read_from_its_end_gets_one_error(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as live:
        stream_id = next(iter(gw.env.relay.streams))
        gw.env.scripted.script(stream_id).put(*text_chunks(1))
        events = [await live.next() for _ in range(4)]
        await gw.env.relay.close(grace=0)  # interrupts the producer
        events += await live.rest()
    assert terminal_chunks(events) == ["error"]
