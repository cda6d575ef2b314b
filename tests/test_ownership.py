"""Chats belong to the subject whose Start created them: every RPC by another subject on such a
chat is answered exactly as for a chat that does not exist, and changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.client import ReaderRefused, RelayClient
from relay.client.errors import RelayError
from relay.domain.core import Relay
from relay.domain.errors import NotFound
from relay.domain.model import Caller, StartRequest, StopOutcome, StreamState, UIMessage
from relay.domain.ports import Begun
from relay.producers import ProducerRegistry
from relay.stores.postgres import PostgresChatStore
from relay.stores.sqlite import SqliteStore
from tests.conftest import (
    Env,
    ScriptedProducer,
    collect,
    eventually,
    read_chunks,
    text_chunks,
    user,
)
from tests.test_cluster import build

ALICE, BOB = "alice@example.com", "bob"


@pytest.fixture(params=["embedded", "cluster"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def refusal(call: object) -> tuple[str, str]:
    """The status name and message of the error the client raises."""
    try:
        await call  # type: ignore[misc]
    except RelayError as exc:
        return exc.code, exc.message
    raise AssertionError("the call was not refused")


async def attach_refusal(
    client: RelayClient, subject: str | None, *, chat_id: str = "", stream_id: str = ""
) -> tuple[str, str]:
    return await refusal(client.open_attach(chat_id=chat_id, stream_id=stream_id, subject=subject))


async def alice_live_answer(env: Env) -> str:
    """Alice's chat `c` with a live answer of three chunks so far; returns its stream id."""
    started = await env.client.start(
        "c", [user("secret question")], producer="scripted", subject=ALICE
    )
    env.scripted.script(started.stream_id).put(*text_chunks(0))
    reader = env.client.attach(stream_id=started.stream_id, subject=ALICE)
    assert len(await read_chunks(reader, 3)) == 3
    await reader.aclose()
    return started.stream_id


async def test_another_subject_gets_every_rpc_answered_as_for_a_missing_chat(env: Env) -> None:
    client = env.client
    stream_id = await alice_live_answer(env)
    unknown_stream = "f" * 32

    for intruder in (BOB, None):  # a named subject, and the anonymous one
        # Start: refused before anything happens, even with supersede.
        code, detail = await refusal(
            client.start("c", [user("mine now")], supersede=True, subject=intruder)
        )
        assert (code, detail) == ("NOT_FOUND", "chat 'c' not found")
        # Attach, by chat and by stream: the very answers a missing chat and stream get.
        code, detail = await attach_refusal(client, intruder, chat_id="c")
        missing = await attach_refusal(client, intruder, chat_id="no-such-chat")
        assert (code, detail.replace("'c'", "'no-such-chat'")) == missing
        code, detail = await attach_refusal(client, intruder, stream_id=stream_id)
        missing = await attach_refusal(client, intruder, stream_id=unknown_stream)
        assert (code, detail.replace(stream_id, unknown_stream)) == missing
        assert code == "NOT_FOUND"
        # AttachMany: the call's subject, and a subscription naming its own.
        async with client.attach_many(subject=intruder) as readers:
            readers.subscribe(1, chat_id="c")
            readers.subscribe(2, stream_id=stream_id)
            readers.subscribe(3, chat_id="c", subject=BOB)
            readers.done_subscribing()
            refused = {tag: event async for tag, event in readers}
        assert all(
            isinstance(e, ReaderRefused) and e.code == "NOT_FOUND" for e in refused.values()
        ), refused
        # Stop, GetActive, ListMessages: nothing there.
        partial = UIMessage("a1", "assistant", [{"type": "text", "text": "overwritten"}])
        for named in ("", stream_id):
            stopped = await client.stop("c", named, partial, subject=intruder)
            assert (stopped.outcome, stopped.stream_id, stopped.end) == (
                StopOutcome.NO_ACTIVE_STREAM,
                named,
                None,
            )
        assert await client.get_active("c", subject=intruder) is None
        assert await client.list_messages("c", subject=intruder) == []

    # Nothing changed: the answer is still live and Alice's, her history untouched.
    env.relay._subjects.clear()  # the binding is the store's, not this relay's memory
    active = await client.get_active("c", subject=ALICE)
    assert active is not None and active.stream_id == stream_id
    assert active.state is StreamState.LIVE
    assert [m.id for m in await client.list_messages("c", subject=ALICE)] == ["u1"]
    env.scripted.script(stream_id).put({"type": "finish"}, None)
    chunks, end = await collect(client.attach(stream_id=stream_id, subject=ALICE))
    assert end.state is StreamState.COMPLETED
    assert json.loads(chunks[-1]) == {"type": "finish"}


async def test_the_owner_uses_every_rpc_as_before(env: Env) -> None:
    client = env.client
    stream_id = await alice_live_answer(env)
    attached = await client.open_attach(chat_id="c", subject=ALICE)
    assert attached.stream_id == stream_id
    await attached.events.aclose()
    async with client.attach_many() as readers:
        readers.subscribe(1, chat_id="c", subject=ALICE)
        async for tag, event in readers:
            assert (tag, getattr(event, "stream_id", None)) == (1, stream_id)
            break
    stopped = await client.stop("c", subject=ALICE)
    assert stopped.outcome is StopOutcome.STOPPED
    restarted = await client.start("c", [user("again", "u2")], subject=ALICE)
    _, end = await collect(client.attach(stream_id=restarted.stream_id, subject=ALICE))
    assert end.state is StreamState.COMPLETED
    ids = [m.id for m in await client.list_messages("c", subject=ALICE)]
    assert ids[:1] == ["u1"] and "u2" in ids


async def test_subjects_are_exact_and_may_be_any_text(env: Env) -> None:
    """No normalisation: `Alice` is not `alice`; a subject outside ASCII travels intact."""
    owner = "jürgen/ä b%2F"
    started = await env.client.start("c", [user("hi")], subject=owner)
    await collect(env.client.attach(stream_id=started.stream_id, subject=owner))
    assert len(await env.client.list_messages("c", subject=owner)) == 2  # question, answer
    for other in ("Jürgen/ä b%2F", "jürgen/ä b/", ""):
        assert await env.client.list_messages("c", subject=other) == []


async def test_a_subject_over_the_limit_or_with_control_characters_is_invalid(env: Env) -> None:
    code, detail = await refusal(env.client.get_active("c", subject="x" * 257))
    assert code == "INVALID_ARGUMENT"
    assert "256" in detail
    for bad in ("eve\x00", "eve\n", "\x7f"):  # NUL made PostgreSQL fail the Start
        code, detail = await refusal(env.client.start("c", [user("hi")], subject=bad))
        assert (code, detail) == (
            "INVALID_ARGUMENT",
            "the subject holds control characters",
        )


# -- races with the Start that creates the chat ---------------------------------------------------


class RaceHooks:
    """A store that lets a test run another subject's call in the gaps between store operations:
    `hold_begin` pauses the next begin_stream before its transaction; `after_next_read` runs
    once right after the next read of a chat (its result already taken)."""

    hold_begin: asyncio.Event | None = None
    after_next_read: Callable[[], Awaitable[object]] | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.begin_reached = asyncio.Event()

    async def begin_stream(self, *args: Any, **kwargs: Any) -> Begun:
        if self.hold_begin is not None:
            self.begin_reached.set()
            await self.hold_begin.wait()
        begun: Begun = await super().begin_stream(*args, **kwargs)  # type: ignore[misc]
        return begun

    async def _after_read(self) -> None:
        hook, self.after_next_read = self.after_next_read, None
        if hook is not None:
            await hook()

    async def chat_subject(self, chat_id: str) -> str | None:
        found: str | None = await super().chat_subject(chat_id)  # type: ignore[misc]
        await self._after_read()
        return found

    async def get_active(self, chat_id: str, subject: str | None = None) -> str | None:
        found: str | None = await super().get_active(chat_id, subject)  # type: ignore[misc]
        await self._after_read()
        return found

    async def list_messages(self, chat_id: str, subject: str | None = None) -> list[UIMessage]:
        found: list[UIMessage] = await super().list_messages(chat_id, subject)  # type: ignore[misc]
        await self._after_read()
        return found


class RacingStore(RaceHooks, SqliteStore):
    pass


class RacingPostgres(RaceHooks, PostgresChatStore):
    pass


@pytest.fixture
async def racing(tmp_path: Path) -> AsyncIterator[tuple[Relay, RacingStore, ScriptedProducer]]:
    store, scripted = RacingStore(tmp_path / "relay.sqlite3"), ScriptedProducer()
    relay = Relay(store, ProducerRegistry({"scripted": scripted}, "scripted"), sweep_interval=None)
    await relay.open()
    try:
        yield relay, store, scripted
    finally:
        await relay.close(grace=0)


def a_start(chat_id: str = "c") -> StartRequest:
    return StartRequest(chat_id=chat_id, messages=[user("alice's secret")], supersede=True)


async def test_a_stop_waiting_behind_the_creating_start_does_not_stop_it(
    racing: tuple[Relay, RacingStore, ScriptedProducer],
) -> None:
    relay, store, _ = racing
    store.hold_begin = asyncio.Event()
    alice = asyncio.create_task(relay.start(a_start(), Caller(ALICE)))
    await store.begin_reached.wait()  # Alice holds the chat; her row is not written yet
    partial = UIMessage("a1", "assistant", [{"type": "text", "text": "written by Bob"}])
    bob = asyncio.create_task(relay.stop("c", "", partial, Caller(BOB)))
    await eventually(lambda: relay._chat_locks["c"][1][0] == 2)  # Bob waits for the chat
    store.hold_begin.set()
    started = await alice
    stopped = await bob
    assert (stopped.outcome, stopped.end) == (StopOutcome.NO_ACTIVE_STREAM, None)
    assert relay.streams[started.stream_id].end is None  # still live
    history = await relay.list_messages("c", Caller(ALICE))
    assert [m.id for m in history] == ["u1"]


async def bobs_call(relay: Relay, call: str) -> None:
    """Bob's `call` on chat `c`, checked to answer as for a chat that does not exist."""
    bob = Caller(BOB)
    if call == "get_active":
        assert await relay.get_active("c", bob) is None
    elif call == "list_messages":
        assert await relay.list_messages("c", bob) == []
    elif call == "attach":
        with pytest.raises(NotFound, match="chat 'c' has no active stream"):
            await relay.attach(chat_id="c", caller=bob)
    elif call == "start":
        with pytest.raises(NotFound, match="chat 'c' not found"):
            await relay.start(StartRequest("c", [user("mine")], supersede=True), bob)
    else:
        assert (await relay.stop("c", "", None, bob)).outcome is StopOutcome.NO_ACTIVE_STREAM


@pytest.mark.parametrize("call", ["get_active", "list_messages", "attach"])
async def test_a_chat_created_between_two_reads_of_another_subject_stays_hidden(
    racing: tuple[Relay, RacingStore, ScriptedProducer], call: str
) -> None:
    """Whatever Bob's call reads first, Alice's Start lands right after it: what Bob's call
    does next must still treat the chat as hers."""
    relay, store, _ = racing
    started: list[str] = []

    async def alice_starts() -> None:
        started.append((await relay.start(a_start(), Caller(ALICE))).stream_id)

    store.after_next_read = alice_starts
    await bobs_call(relay, call)
    assert len(started) == 1, "the race did not happen"
    assert relay.streams[started[0]].end is None  # Alice's answer is untouched
    assert [m.id for m in await relay.list_messages("c", Caller(ALICE))] == ["u1"]


@pytest.mark.parametrize("call", ["start", "stop", "get_active", "list_messages", "attach"])
async def test_a_chat_created_on_another_relay_mid_call_stays_hidden(
    postgres_dsn: str, redis_url: str, redis_prefix: str, call: str
) -> None:
    """Two relays: Alice's Start on A lands right after the first read of Bob's call on B
    (which holds only B's chat lock). Before, Bob's Start superseded her answer and his Stop
    stopped it."""
    a = build("relay-a", postgres_dsn, redis_url, redis_prefix)
    b = build("relay-b", postgres_dsn, redis_url, redis_prefix)
    store = b.relay.store = RacingPostgres(postgres_dsn)
    started: list[str] = []

    async def alice_starts_on_a() -> None:
        started.append((await a.relay.start(a_start(), Caller(ALICE))).stream_id)

    await a.relay.open()
    await b.relay.open()
    try:
        store.after_next_read = alice_starts_on_a
        await bobs_call(b.relay, call)
        assert len(started) == 1, "the race did not happen"
        assert a.relay.streams[started[0]].end is None  # Alice's answer is untouched
        assert not a.scripted.script(started[0]).cancelled.is_set()
        assert [m.id for m in await a.relay.list_messages("c", Caller(ALICE))] == ["u1"]
    finally:
        await b.relay.close(grace=0)
        await a.relay.close(grace=0)
