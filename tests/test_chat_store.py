"""The ChatStore port's contract (relay.domain.ports), run against every implementation: PostgreSQL
(the cluster's) and SQLite (the embedded one). Then what only PostgreSQL has to show: several
relays on one database, its connection failures, its migrations under a lock."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.domain.errors import NotFound, Unavailable
from relay.domain.model import EndReason, StreamEnd, StreamState, UIMessage
from relay.domain.ports import Begun, ChatStore, StartSeen, StreamRecord
from relay.stores.postgres import _MIGRATIONS, SCHEMA_VERSION, PostgresChatStore
from tests.postgres_server import postgres_dsn, postgres_server  # noqa: F401

CHAT = "chat-1"


def message(message_id: str, text: str = "hi", role: str = "user") -> UIMessage:
    return UIMessage(message_id, role, [{"type": "text", "text": text}])


def record(
    stream_id: str,
    chat_id: str = CHAT,
    owner: str = "relay-a",
    created_at: float = 1.0,
    message_id: str = "",
) -> StreamRecord:
    return StreamRecord(stream_id, chat_id, owner, "echo", created_at, message_id=message_id)


def new_id() -> str:
    return uuid.uuid4().hex


def another(store: ChatStore) -> ChatStore:
    """A second instance on the same database (a restarted or another relay)."""
    if isinstance(store, PostgresChatStore):
        return PostgresChatStore(store.dsn)
    from relay.stores.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    return SqliteStore(store.path)


@pytest.fixture(params=["postgres", "sqlite"])
async def chat_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ChatStore]:
    store: ChatStore
    if request.param == "postgres":
        store = PostgresChatStore(request.getfixturevalue("postgres_dsn"))
    else:
        try:
            from relay.stores.sqlite import SqliteStore
        except ImportError:
            pytest.skip("sqlite not yet on the port")
        store = SqliteStore(tmp_path_factory.mktemp("sqlite") / "relay.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def pg_store(postgres_dsn: str) -> AsyncIterator[PostgresChatStore]:  # noqa: F811
    store = PostgresChatStore(postgres_dsn)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- messages ----------------------------------------------------------------------------------


async def test_an_unknown_chat_has_no_messages_and_no_active_stream(chat_store: ChatStore) -> None:
    assert await chat_store.list_messages("nobody") == []
    assert await chat_store.get_active("nobody") is None


async def test_messages_are_upserted_by_id_new_ones_appended(chat_store: ChatStore) -> None:
    a, b, c = message("a"), message("b", role="assistant"), message("c")
    await chat_store.save_messages(CHAT, [a, b])
    b2 = UIMessage(
        "b",
        "assistant",
        [{"type": "text", "text": "é ✓ \u0000 \n"}, {"type": "data-x", "data": {"z": 1, "a": [2]}}],
        {"model": "m", "n": 1.5},
    )
    await chat_store.save_messages(CHAT, [c, b2])  # b keeps its place; c goes last
    assert await chat_store.list_messages(CHAT) == [a, b2, c]
    await chat_store.save_messages(CHAT, [message("d"), message("e"), message("d", "again")])
    assert [m.id for m in await chat_store.list_messages(CHAT)] == ["a", "b", "c", "d", "e"]
    assert (await chat_store.list_messages(CHAT))[3] == message("d", "again")
    assert await chat_store.list_messages("other") == []


async def test_replace_history_drops_the_other_messages(chat_store: ChatStore) -> None:
    await chat_store.save_messages(CHAT, [message("a"), message("b"), message("c")])
    await chat_store.save_messages("other", [message("a")])
    await chat_store.save_messages(CHAT, [message("c", "new"), message("a")], replace_history=True)
    assert await chat_store.list_messages(CHAT) == [message("c", "new"), message("a")]
    await chat_store.save_messages(CHAT, [message("z")])
    assert [m.id for m in await chat_store.list_messages(CHAT)] == ["c", "a", "z"]
    assert await chat_store.list_messages("other") == [message("a")]
    await chat_store.save_messages(CHAT, [], replace_history=True)
    assert await chat_store.list_messages(CHAT) == []


# -- streams -----------------------------------------------------------------------------------


async def test_begin_stream_is_a_compare_and_set(chat_store: ChatStore) -> None:
    s1, s2, s3 = new_id(), new_id(), new_id()
    assert await chat_store.begin_stream(record(s1), "r1", None)
    assert await chat_store.get_active(CHAT) == s1
    # Still expecting no active stream: refused, nothing written.
    assert not await chat_store.begin_stream(record(s3), "r3", None)
    assert await chat_store.get_stream(s3) is None
    assert await chat_store.find_request(CHAT, "r3") is None
    assert await chat_store.get_active(CHAT) == s1
    # Replacing the wrong one: refused too.
    assert not await chat_store.begin_stream(record(s3), "r3", s2)
    assert await chat_store.get_stream(s3) is None
    assert await chat_store.begin_stream(record(s2), "r2", s1)
    assert await chat_store.get_active(CHAT) == s2
    # A chat that does not exist has no active stream to replace.
    assert not await chat_store.begin_stream(record(s3, chat_id="new"), "", s1)
    assert await chat_store.get_stream(s3) is None
    assert await chat_store.get_active("new") is None


async def test_begin_stream_saves_its_messages_only_when_it_wins(chat_store: ChatStore) -> None:
    """A Start that loses the race leaves the winner's history alone, also with
    replace_history (it erased it when messages were saved before the compare-and-set)."""
    s1, s2 = new_id(), new_id()
    won = [message("u1", text="from the winner")]
    assert await chat_store.begin_stream(record(s1), "", None, won, replace_history=True)
    lost = [message("u2", text="from the loser")]
    assert not await chat_store.begin_stream(record(s2), "", None, lost, replace_history=True)
    assert await chat_store.list_messages(CHAT) == won
    later = [message("u3", text="next turn")]
    assert await chat_store.begin_stream(record(s2), "", s1, later)
    assert await chat_store.list_messages(CHAT) == won + later


async def test_the_first_start_binds_a_chat_to_its_subject(chat_store: ChatStore) -> None:
    assert await chat_store.chat_subject(CHAT) is None
    first = new_id()
    assert await chat_store.begin_stream(record(first), "", None, [message("u1")], False, "alice")
    assert await chat_store.chat_subject(CHAT) == "alice"
    # Another subject's Start is refused whole: no stream, no message, no change of binding.
    with pytest.raises(NotFound):
        await chat_store.begin_stream(record(new_id()), "", first, [message("u2")], True, "bob")
    assert await chat_store.chat_subject(CHAT) == "alice"
    assert await chat_store.get_active(CHAT) == first
    assert [m.id for m in await chat_store.list_messages(CHAT)] == ["u1"]
    # The owner's next Start goes on as before.
    assert await chat_store.begin_stream(record(new_id()), "", first, [], False, "alice")


async def test_two_subjects_racing_to_create_a_chat_have_one_winner(chat_store: ChatStore) -> None:
    results = await asyncio.gather(
        *(
            chat_store.begin_stream(record(new_id()), "", None, [message(s)], False, s)
            for s in ("alice", "bob")
        ),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Begun", "NotFound"]
    winner = await chat_store.chat_subject(CHAT)
    assert [m.id for m in await chat_store.list_messages(CHAT)] == [winner]


async def test_find_request_returns_the_stream_a_key_created(chat_store: ChatStore) -> None:
    s1, s2 = new_id(), new_id()
    assert await chat_store.begin_stream(record(s1), "key-1", None)
    assert await chat_store.find_request(CHAT, "key-1") == s1
    assert await chat_store.find_request(CHAT, "key-2") is None
    assert await chat_store.find_request("other", "key-1") is None
    # Without a key there is nothing to find.
    end = StreamEnd(StreamState.COMPLETED, 0)
    await chat_store.end_stream(s1, CHAT, end, ended_at=2.0)
    assert await chat_store.begin_stream(record(s2), "", None)
    assert await chat_store.find_request(CHAT, "") is None
    assert await chat_store.find_request(CHAT, "key-1") == s1
    # The same key on another chat is another request.
    s3 = new_id()
    assert await chat_store.begin_stream(record(s3, chat_id="other"), "key-1", None)
    assert await chat_store.find_request("other", "key-1") == s3


async def test_get_stream_reads_a_live_and_an_ended_stream(chat_store: ChatStore) -> None:
    s1 = new_id()
    live = StreamRecord(s1, CHAT, "relay-a", "openai", 1234.5678)
    assert await chat_store.begin_stream(live, "r", None)
    assert await chat_store.get_stream(s1) == live
    assert await chat_store.get_stream(new_id()) is None
    end = StreamEnd(
        StreamState.FAILED,
        7,
        "boom: ünïcode",
        UIMessage("m1", "assistant", [{"type": "text", "text": "part"}], {"k": [1, 2]}),
    )
    assert await chat_store.end_stream(s1, CHAT, end, ended_at=2345.25) == end
    ended = await chat_store.get_stream(s1)
    assert ended == StreamRecord(s1, CHAT, "relay-a", "openai", 1234.5678, end, 2345.25)


async def test_the_first_end_wins(chat_store: ChatStore) -> None:
    s1 = new_id()
    assert await chat_store.begin_stream(record(s1), "r", None)
    first = StreamEnd(StreamState.STOPPED, 3, "", message("answer", "partial", "assistant"))
    second = StreamEnd(StreamState.COMPLETED, 5, "", message("answer", "whole", "assistant"))
    assert await chat_store.end_stream(s1, CHAT, first, ended_at=10.0) == first
    assert await chat_store.end_stream(s1, CHAT, second, ended_at=11.0) == first
    stored = await chat_store.get_stream(s1)
    assert stored is not None
    assert (stored.end, stored.ended_at) == (first, 10.0)
    # The first end's message is the one persisted, and the chat is free.
    assert await chat_store.list_messages(CHAT) == [message("answer", "partial", "assistant")]
    assert await chat_store.get_active(CHAT) is None


async def test_an_end_keeps_its_reason(chat_store: ChatStore) -> None:
    s1, s2 = new_id(), new_id()
    assert await chat_store.begin_stream(record(s1), "", None)
    stopped = StreamEnd(StreamState.STOPPED, 2, "", None, EndReason.SUPERSEDED)
    assert await chat_store.end_stream(s1, CHAT, stopped, ended_at=3.0) == stopped
    # The first end holds, reason and all.
    later = StreamEnd(StreamState.COMPLETED, 4, "", None, EndReason.FINISHED)
    assert await chat_store.end_stream(s1, CHAT, later, ended_at=4.0) == stopped
    stored = await chat_store.get_stream(s1)
    assert stored is not None and stored.end == stopped
    assert stored.end.reason is EndReason.SUPERSEDED
    # Each reason survives the round trip.
    assert await chat_store.begin_stream(record(s2, "other"), "", None)
    failed = StreamEnd(StreamState.FAILED, 0, "x", None, EndReason.PRODUCER_FAILED)
    await chat_store.end_stream(s2, "other", failed, ended_at=5.0)
    stored = await chat_store.get_stream(s2)
    assert stored is not None and stored.end == failed


async def test_end_stream_persists_its_message_after_the_history(chat_store: ChatStore) -> None:
    s1 = new_id()
    await chat_store.save_messages(CHAT, [message("q1"), message("q2")])
    assert await chat_store.begin_stream(record(s1), "r", None)
    answer = message("answer", "hello", "assistant")
    end = StreamEnd(StreamState.COMPLETED, 2, "", answer)
    assert await chat_store.end_stream(s1, CHAT, end, ended_at=3.0) == end
    assert await chat_store.list_messages(CHAT) == [message("q1"), message("q2"), answer]
    # An end without a message writes none.
    s2 = new_id()
    assert await chat_store.begin_stream(record(s2), "r2", None)
    await chat_store.end_stream(s2, CHAT, StreamEnd(StreamState.FAILED, 0, "no"), ended_at=4.0)
    assert len(await chat_store.list_messages(CHAT)) == 3


async def test_end_stream_clears_the_active_stream_only_if_it_is_this_one(
    chat_store: ChatStore,
) -> None:
    s1, s2 = new_id(), new_id()
    assert await chat_store.begin_stream(record(s1), "r1", None)
    assert await chat_store.begin_stream(record(s2), "r2", s1)  # superseded, not ended yet
    stopped = StreamEnd(StreamState.STOPPED, 1)
    assert await chat_store.end_stream(s1, CHAT, stopped, ended_at=5.0) == stopped
    assert await chat_store.get_active(CHAT) == s2
    done = StreamEnd(StreamState.COMPLETED, 4)
    assert await chat_store.end_stream(s2, CHAT, done, ended_at=6.0) == done
    assert await chat_store.get_active(CHAT) is None


async def test_ending_an_unknown_stream_is_not_found(chat_store: ChatStore) -> None:
    with pytest.raises(NotFound):
        await chat_store.end_stream(new_id(), CHAT, StreamEnd(StreamState.COMPLETED, 0), 1.0)
    assert chat_store.error is None
    assert await chat_store.get_active(CHAT) is None


async def test_clear_active_is_a_compare_and_clear(chat_store: ChatStore) -> None:
    s1 = new_id()
    assert not await chat_store.clear_active(CHAT, s1)  # no chat
    assert await chat_store.begin_stream(record(s1), "r", None)
    assert not await chat_store.clear_active(CHAT, new_id())
    assert not await chat_store.clear_active("other", s1)
    assert await chat_store.get_active(CHAT) == s1
    assert await chat_store.clear_active(CHAT, s1)
    assert await chat_store.get_active(CHAT) is None
    assert not await chat_store.clear_active(CHAT, s1)
    # The stream itself is still live: clearing the pointer does not end it.
    stored = await chat_store.get_stream(s1)
    assert stored is not None and stored.end is None


async def test_delete_expired_frees_stream_records_past_the_retention(
    chat_store: ChatStore,
) -> None:
    s1, s2, s3 = new_id(), new_id(), new_id()
    for stream_id, chat_id in ((s1, "c1"), (s2, "c2"), (s3, "c3")):
        assert await chat_store.begin_stream(record(stream_id, chat_id), "key", None)
    answer = message("answer", "kept", "assistant")
    await chat_store.end_stream(s1, "c1", StreamEnd(StreamState.COMPLETED, 1, "", answer), 10.0)
    await chat_store.end_stream(s2, "c2", StreamEnd(StreamState.FAILED, 0, "x"), 20.0)
    assert await chat_store.delete_expired(110.0, 100.0) == []  # ended at 10: not before 10
    assert await chat_store.delete_expired(115.0, 100.0) == [s1]
    assert await chat_store.get_stream(s1) is None
    assert await chat_store.find_request("c1", "key") is None
    assert await chat_store.list_messages("c1") == [answer]  # messages are not stream records
    assert await chat_store.delete_expired(1e9, 100.0) == [s2]
    assert await chat_store.get_stream(s2) is None
    assert await chat_store.get_stream(s3) is not None  # live: never freed
    assert await chat_store.delete_expired(1e9, 100.0) == []


async def test_a_stream_with_its_own_retention_is_freed_when_that_passes(
    chat_store: ChatStore,
) -> None:
    short, usual, long = new_id(), new_id(), new_id()
    for stream_id, retention in ((short, 5.0), (usual, None), (long, 500.0)):
        own = StreamRecord(stream_id, stream_id, "relay-a", "echo", 1.0, retention_s=retention)
        assert await chat_store.begin_stream(own, "", None)
        await chat_store.end_stream(stream_id, stream_id, StreamEnd(StreamState.STOPPED, 0), 100.0)
    stored = await chat_store.get_stream(long)
    assert stored is not None and stored.retention_s == 500.0 and stored.ended_at == 100.0
    # The relay's retention here is 50 s: it holds for the stream without one of its own.
    assert await chat_store.delete_expired(105.0, 50.0) == []
    assert await chat_store.delete_expired(105.5, 50.0) == [short]
    assert await chat_store.delete_expired(150.0, 50.0) == []
    assert await chat_store.delete_expired(150.5, 50.0) == [usual]
    assert await chat_store.delete_expired(600.0, 50.0) == []
    assert await chat_store.delete_expired(600.5, 50.0) == [long]


# -- stops before their start -------------------------------------------------------------------

STOPPED_FIRST = StreamEnd(StreamState.STOPPED, 0, "", None, EndReason.STOPPED_BEFORE_START)


async def test_a_stop_before_its_start_by_request_id_stops_that_start(
    chat_store: ChatStore,
) -> None:
    s1, s2 = new_id(), new_id()
    # The chat does not exist yet (a first message): the tombstone is the caller's.
    assert await chat_store.stop_before_start(CHAT, "alice", "r1", "", 100.0) == StartSeen(False)
    assert await chat_store.get_active(CHAT) is None  # nothing else was written
    assert await chat_store.chat_subject(CHAT) is None
    begun = await chat_store.begin_stream(
        record(s1, created_at=50.0, message_id="u1"), "r1", None, [message("u1")], True, "alice"
    )
    assert begun is Begun.STOPPED_BEFORE_START
    # Its messages are saved, its stream recorded already ended, and the chat has no active one.
    assert await chat_store.list_messages(CHAT) == [message("u1")]
    assert await chat_store.chat_subject(CHAT) == "alice"
    assert await chat_store.get_active(CHAT) is None
    assert await chat_store.get_stream(s1) == StreamRecord(
        s1, CHAT, "relay-a", "echo", 50.0, STOPPED_FIRST, 50.0, message_id="u1"
    )
    assert await chat_store.find_request(CHAT, "r1") == s1
    # The tombstone is consumed: the next Start runs; a Stop naming r1 now finds its stream.
    assert await chat_store.begin_stream(
        record(s2, created_at=51.0), "r2", None, (), False, "alice"
    )
    assert await chat_store.stop_before_start(CHAT, "alice", "r1", "", 100.0) == StartSeen(True, s1)
    assert await chat_store.stop_before_start(CHAT, "alice", "r2", "", 100.0) == StartSeen(True, s2)
    assert await chat_store.delete_stop_tombstones(1e9) == 0


async def test_a_stop_before_its_start_by_message_id_stops_that_start(
    chat_store: ChatStore,
) -> None:
    s1, s2, s3 = new_id(), new_id(), new_id()
    assert await chat_store.begin_stream(record(s1, message_id="u1"), "", None, [message("u1")])
    await chat_store.end_stream(s1, CHAT, StreamEnd(StreamState.COMPLETED, 3), 2.0)
    # u2 is not persisted: the Start that sends it has not arrived.
    assert await chat_store.stop_before_start(CHAT, "", "", "u2", 100.0) == StartSeen(False)
    begun = await chat_store.begin_stream(
        record(s2, created_at=3.0, message_id="u2"), "", None, [message("u2")]
    )
    assert begun is Begun.STOPPED_BEFORE_START
    stored = await chat_store.get_stream(s2)
    assert stored is not None and stored.end == STOPPED_FIRST and stored.message_id == "u2"
    # A persisted message: its Start has arrived, and its stream is found.
    assert await chat_store.stop_before_start(CHAT, "", "", "u2", 100.0) == StartSeen(True, s2)
    assert await chat_store.stop_before_start(CHAT, "", "", "u1", 100.0) == StartSeen(True, s1)
    # A regenerate of u1 (the same last message): the active stream is the one found.
    assert await chat_store.begin_stream(
        record(s3, created_at=0.5, message_id="u1"), "", None, [message("u1")], True
    )
    assert await chat_store.stop_before_start(CHAT, "", "", "u1", 100.0) == StartSeen(True, s3)
    # A message persisted without a stream of its own (saved another way).
    await chat_store.save_messages(CHAT, [message("u9")])
    assert await chat_store.stop_before_start(CHAT, "", "", "u9", 100.0) == StartSeen(True, None)
    assert await chat_store.delete_stop_tombstones(1e9) == 0  # no tombstone was left


async def test_an_expired_tombstone_stops_nothing_and_is_swept(chat_store: ChatStore) -> None:
    s1 = new_id()
    await chat_store.stop_before_start(CHAT, "", "r1", "", 100.0)
    await chat_store.stop_before_start(CHAT, "", "r2", "", 300.0)
    await chat_store.stop_before_start("other", "", "", "u1", 200.0)
    # A tombstone still holds at its expiry; the Start 0.5 s later is not stopped.
    assert await chat_store.begin_stream(record(s1, created_at=100.5), "r1", None) is Begun.LIVE
    assert await chat_store.delete_stop_tombstones(100.0) == 0
    assert await chat_store.delete_stop_tombstones(250.0) == 2  # r1's and other's
    assert await chat_store.delete_stop_tombstones(1e9) == 1  # r2's


async def test_a_repeated_stop_extends_its_tombstone(chat_store: ChatStore) -> None:
    await chat_store.stop_before_start(CHAT, "", "r1", "", 100.0)
    await chat_store.stop_before_start(CHAT, "", "r1", "", 200.0)
    await chat_store.stop_before_start(CHAT, "", "r1", "", 150.0)  # never shortened
    stopped = await chat_store.begin_stream(record(new_id(), created_at=199.0), "r1", None)
    assert stopped is Begun.STOPPED_BEFORE_START


async def test_a_start_that_loses_its_compare_and_set_leaves_the_tombstone(
    chat_store: ChatStore,
) -> None:
    s1, s2, s3 = new_id(), new_id(), new_id()
    assert await chat_store.begin_stream(record(s1), "r1", None) is Begun.LIVE
    await chat_store.stop_before_start(CHAT, "", "r2", "", 100.0)
    assert await chat_store.begin_stream(record(s2), "r2", None) is Begun.LOST
    assert await chat_store.get_active(CHAT) == s1
    assert await chat_store.begin_stream(record(s3), "r2", s1) is Begun.STOPPED_BEFORE_START
    assert await chat_store.get_active(CHAT) is None  # the stale pointer is not kept either


async def test_a_tombstone_is_only_its_subjects(chat_store: ChatStore) -> None:
    s1, s2, s3 = new_id(), new_id(), new_id()
    # Another subject's chat reads as one that does not exist, and nothing is recorded.
    assert await chat_store.begin_stream(record(s1), "r1", None, [message("u1")], False, "alice")
    assert await chat_store.stop_before_start(CHAT, "bob", "r2", "", 100.0) == StartSeen(False)
    assert await chat_store.stop_before_start(CHAT, "bob", "", "u2", 100.0) == StartSeen(False)
    assert await chat_store.stop_before_start(CHAT, "bob", "r1", "", 100.0) == StartSeen(False)
    assert await chat_store.delete_stop_tombstones(1e9) == 0
    await chat_store.end_stream(s1, CHAT, StreamEnd(StreamState.COMPLETED, 0), 2.0)
    begun = await chat_store.begin_stream(
        record(s2, message_id="u2"), "r2", None, [message("u2")], False, "alice"
    )
    assert begun is Begun.LIVE  # bob's Stop changed nothing
    # On a chat that does not exist, bob's tombstone stops only bob's Start.
    await chat_store.stop_before_start("new", "bob", "r3", "", 100.0)
    assert (
        await chat_store.begin_stream(record(s3, "new"), "r3", None, (), False, "alice")
        is Begun.LIVE
    )
    assert await chat_store.delete_stop_tombstones(1e9) == 1  # bob's, never consumed


# -- leases ------------------------------------------------------------------------------------


async def test_leases_are_renewed_read_and_dropped(chat_store: ChatStore) -> None:
    assert await chat_store.lease_expires_at("relay-a") is None
    await chat_store.renew_lease("relay-a", 100.5)
    assert await chat_store.lease_expires_at("relay-a") == 100.5
    await chat_store.renew_lease("relay-a", 200.25)
    assert await chat_store.lease_expires_at("relay-a") == 200.25
    await chat_store.renew_lease("relay-b", 50.0)
    await chat_store.drop_lease("relay-a")
    assert await chat_store.lease_expires_at("relay-a") is None
    assert await chat_store.lease_expires_at("relay-b") == 50.0
    await chat_store.drop_lease("relay-a")  # dropping none is fine


async def test_orphaned_streams_are_live_ones_whose_owner_holds_no_lease(
    chat_store: ChatStore,
) -> None:
    held, lapsed, never, ended = new_id(), new_id(), new_id(), new_id()
    await chat_store.renew_lease("held", 200.0)
    await chat_store.renew_lease("lapsed", 50.0)
    for stream_id, owner in ((held, "held"), (lapsed, "lapsed"), (never, "never")):
        assert await chat_store.begin_stream(record(stream_id, owner, owner), "", None)
    assert await chat_store.begin_stream(record(ended, "ended", "never"), "", None)
    await chat_store.end_stream(ended, "ended", StreamEnd(StreamState.COMPLETED, 0), 60.0)

    orphans = await chat_store.orphaned_streams(now=100.0)
    assert {o.stream_id for o in orphans} == {lapsed, never}
    assert {o.stream_id: o for o in orphans}[lapsed] == record(lapsed, "lapsed", "lapsed")
    # A lease that lapses exactly now still holds.
    assert {o.stream_id for o in await chat_store.orphaned_streams(now=50.0)} == {never}
    assert {o.stream_id for o in await chat_store.orphaned_streams(now=200.5)} == {
        held,
        lapsed,
        never,
    }
    await chat_store.renew_lease("lapsed", 300.0)
    await chat_store.drop_lease("held")
    assert {o.stream_id for o in await chat_store.orphaned_streams(now=100.0)} == {held, never}


# -- concurrency, cancellation, reopening ------------------------------------------------------


async def test_of_two_begin_streams_replacing_the_same_one_exactly_one_wins(
    chat_store: ChatStore,
) -> None:
    for round_ in range(5):
        chat_id = f"race-{round_}"
        contenders = [new_id() for _ in range(4)]
        won = await asyncio.gather(
            *(chat_store.begin_stream(record(s, chat_id), s, None) for s in contenders)
        )
        assert sorted(won) == [Begun.LOST, Begun.LOST, Begun.LOST, Begun.LIVE]
        first = contenders[won.index(Begun.LIVE)]
        assert await chat_store.get_active(chat_id) == first
        successors = [new_id() for _ in range(4)]
        won = await asyncio.gather(
            *(chat_store.begin_stream(record(s, chat_id), s, first) for s in successors)
        )
        assert sorted(won) == [Begun.LOST, Begun.LOST, Begun.LOST, Begun.LIVE]
        second = successors[won.index(Begun.LIVE)]
        assert await chat_store.get_active(chat_id) == second
        for loser in [s for s in contenders + successors if s not in (first, second)]:
            assert await chat_store.get_stream(loser) is None
            assert await chat_store.find_request(chat_id, loser) is None


async def test_an_operation_whose_caller_is_cancelled_still_commits_whole(
    chat_store: ChatStore,
) -> None:
    s1 = new_id()
    assert await chat_store.begin_stream(record(s1), "r", None)
    messages = [message(f"m{i}") for i in range(20)]
    answer = message("answer", "partial", "assistant")
    end = StreamEnd(StreamState.STOPPED, 2, "", answer)

    saving = asyncio.create_task(chat_store.save_messages(CHAT, messages))
    ending = asyncio.create_task(chat_store.end_stream(s1, CHAT, end, ended_at=9.0))
    await asyncio.sleep(0)  # both have begun: their transactions are under way
    saving.cancel()
    ending.cancel()
    for task in (saving, ending):
        with pytest.raises(asyncio.CancelledError):
            await task
    await chat_store.close()  # waits for the transactions their callers gave up on

    reopened = another(chat_store)
    await reopened.open()
    try:
        saved = await reopened.list_messages(CHAT)  # the two ran at once: either may be first
        assert [m for m in saved if m != answer] == messages and answer in saved
        stored = await reopened.get_stream(s1)
        assert stored is not None and stored.end == end
        assert await reopened.get_active(CHAT) is None
    finally:
        await reopened.close()


async def test_reopening_keeps_the_data_and_migrates_nothing_twice(chat_store: ChatStore) -> None:
    s1 = new_id()
    await chat_store.save_messages(CHAT, [message("a")])
    assert await chat_store.begin_stream(record(s1), "r", None)
    await chat_store.probe()
    await chat_store.close()
    for _ in range(2):
        reopened = another(chat_store)
        await reopened.open()
        try:
            await reopened.probe()
            assert reopened.error is None
            assert await reopened.list_messages(CHAT) == [message("a")]
            assert await reopened.get_active(CHAT) == s1
            assert await reopened.find_request(CHAT, "r") == s1
        finally:
            await reopened.close()


async def test_a_closed_store_is_unavailable(chat_store: ChatStore) -> None:
    await chat_store.close()
    with pytest.raises(Unavailable):
        await chat_store.list_messages(CHAT)
    await chat_store.close()  # twice is fine


# -- PostgreSQL only ---------------------------------------------------------------------------


async def test_postgres_two_relays_race_for_a_chat_and_one_wins(postgres_dsn: str) -> None:  # noqa: F811
    relays = [PostgresChatStore(postgres_dsn) for _ in range(3)]
    await asyncio.gather(*(relay.open() for relay in relays))  # migrations take turns
    try:
        for round_ in range(10):
            chat_id = f"race-{round_}"
            contenders = [new_id() for _ in relays]
            won = await asyncio.gather(
                *(
                    relay.begin_stream(record(s, chat_id, owner=f"relay-{i}"), "", None)
                    for i, (relay, s) in enumerate(zip(relays, contenders, strict=True))
                )
            )
            assert won.count(Begun.LIVE) == 1
            assert await relays[0].get_active(chat_id) == contenders[won.index(Begun.LIVE)]
    finally:
        await asyncio.gather(*(relay.close() for relay in relays))


async def test_postgres_concurrent_saves_never_share_a_position(postgres_dsn: str) -> None:  # noqa: F811
    relays = [PostgresChatStore(postgres_dsn) for _ in range(2)]
    for relay in relays:
        await relay.open()
    try:
        await asyncio.gather(
            *(
                relays[i % 2].save_messages(CHAT, [message(f"m{i}-{j}") for j in range(3)])
                for i in range(12)
            )
        )
        saved = await relays[0].list_messages(CHAT)
        assert len(saved) == 36
        for i in range(12):  # each save's messages stay together, in order
            ids = [m.id for m in saved]
            at = ids.index(f"m{i}-0")
            assert ids[at : at + 3] == [f"m{i}-0", f"m{i}-1", f"m{i}-2"]
        connection = await asyncpg.connect(postgres_dsn)
        try:
            positions = await connection.fetch("SELECT position FROM messages ORDER BY position")
        finally:
            await connection.close()
        assert [row["position"] for row in positions] == list(range(36))
    finally:
        for relay in relays:
            await relay.close()


async def test_postgres_a_cancelled_end_blocked_mid_transaction_commits_whole(
    pg_store: PostgresChatStore,
) -> None:
    s1 = new_id()
    assert await pg_store.begin_stream(record(s1), "r", None)
    answer = message("answer", "partial", "assistant")
    end = StreamEnd(StreamState.STOPPED, 2, "", answer)
    blocker = await asyncpg.connect(pg_store.dsn)
    try:
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", CHAT)
        ending = asyncio.create_task(pg_store.end_stream(s1, CHAT, end, ended_at=9.0))
        # Wait until the end has recorded itself and waits for the chat's lock (PostgreSQL
        # tells nobody when a backend starts waiting: we ask it).
        async with asyncio.timeout(10):
            while not await blocker.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ):
                await asyncio.sleep(0.01)
        ending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ending
        await hold.rollback()
    finally:
        await blocker.close()
    await pg_store.close()
    reopened = PostgresChatStore(pg_store.dsn)
    await reopened.open()
    try:
        stored = await reopened.get_stream(s1)
        assert stored is not None and stored.end == end
        assert await reopened.list_messages(CHAT) == [answer]
        assert await reopened.get_active(CHAT) is None
    finally:
        await reopened.close()


async def test_postgres_failures_are_unavailable_until_healed(pg_store: PostgresChatStore) -> None:
    connection = await asyncpg.connect(pg_store.dsn)
    try:
        await connection.execute("ALTER TABLE leases RENAME TO leases_away")
        with pytest.raises(Unavailable, match="the relay's store failed; retry later"):
            await pg_store.renew_lease("relay-a", 10.0)
        assert pg_store.error is not None and pg_store.error.startswith("renew_lease: ")
        await connection.execute("ALTER TABLE leases_away RENAME TO leases")
    finally:
        await connection.close()
    await pg_store.renew_lease("relay-a", 10.0)
    assert pg_store.error is None
    assert await pg_store.lease_expires_at("relay-a") == 10.0


async def test_postgres_an_unreachable_server_fails_open_plainly() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    store = PostgresChatStore(f"postgresql://relay:s3cret-pw@127.0.0.1:{port}/relaydb")
    with pytest.raises(Unavailable) as failure:
        await store.open()
    assert f"127.0.0.1:{port}/relaydb" in str(failure.value)
    assert "s3cret-pw" not in str(failure.value)
    assert store.error is not None and "s3cret-pw" not in store.error
    await store.close()


async def test_postgres_refused_credentials_or_database_fail_open_plainly() -> None:
    server = postgres_server()
    for dsn, where in (
        (f"postgresql://no_such_role:pw-123@127.0.0.1:{server.port}/postgres", "/postgres"),
        (f"postgresql://postgres@127.0.0.1:{server.port}/no_such_db", "/no_such_db"),
    ):
        store = PostgresChatStore(dsn)
        with pytest.raises(Unavailable) as failure:
            await store.open()
        assert f"127.0.0.1:{server.port}{where}" in str(failure.value)
        assert "pw-123" not in str(failure.value)


async def test_postgres_a_newer_schema_is_refused(postgres_dsn: str) -> None:  # noqa: F811
    store = PostgresChatStore(postgres_dsn)
    await store.open()
    await store.close()
    connection = await asyncpg.connect(postgres_dsn)
    try:
        assert await connection.fetchval("SELECT version FROM schema_version") == SCHEMA_VERSION
        assert await connection.fetchval("SELECT count(*) FROM schema_version") == 1
        await connection.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await connection.close()
    with pytest.raises(Unavailable, match="upgrade the relay"):
        await PostgresChatStore(postgres_dsn).open()


async def test_postgres_an_error_message_holding_nul_is_stored(pg_store: PostgresChatStore) -> None:
    # PostgreSQL text cannot hold U+0000, which a producer's exception text may.
    s1 = new_id()
    assert await pg_store.begin_stream(record(s1), "r", None)
    end = StreamEnd(StreamState.FAILED, 0, "bad\x00byte")
    assert await pg_store.end_stream(s1, CHAT, end, ended_at=1.0) == end
    stored = await pg_store.get_stream(s1)
    assert stored is not None and stored.end == StreamEnd(StreamState.FAILED, 0, "bad\ufffdbyte")


async def test_postgres_streams_ended_before_reasons_were_recorded_read_as_unspecified(
    postgres_dsn: str,  # noqa: F811
) -> None:
    """A database at schema 2 (before end reasons), with an ended stream, migrated on open."""
    s1 = new_id()
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await connection.execute("INSERT INTO schema_version VALUES (2)")
        for script in _MIGRATIONS[:2]:
            await connection.execute(script)
        await connection.execute(
            "INSERT INTO streams (id, chat_id, producer, owner, state, final_offset, created_at,"
            " ended_at) VALUES ($1, $2, 'echo', 'relay-a', 'stopped', 3, 1.0, 2.0)",
            s1,
            CHAT,
        )
    finally:
        await connection.close()
    store = PostgresChatStore(postgres_dsn)
    await store.open()
    try:
        stored = await store.get_stream(s1)
        assert stored is not None
        assert stored.end == StreamEnd(StreamState.STOPPED, 3, "", None, EndReason.UNSPECIFIED)
    finally:
        await store.close()
