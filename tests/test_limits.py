"""Limits per subject and per relay: past each, Start is RESOURCE_EXHAUSTED with a RetryInfo that
says when to retry, and nothing is started or changed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.client import errors as client_errors
from relay.domain.core import Relay
from relay.domain.errors import ResourceExhausted, Unavailable
from relay.domain.model import Caller, Limits, StartRequest, StopOutcome, StreamState
from relay.producers import ProducerRegistry
from tests.conftest import Env, ScriptedProducer, collect, user
from tests.faults import FaultyStore

ALICE, BOB = "alice", "bob"


@pytest.fixture
def limits() -> Limits:
    return Limits(
        live_streams_per_subject_max=2, starts_per_subject_per_minute=4, buffered_bytes_max=10_000
    )


async def exhausted(call: object) -> float:
    """The RetryInfo delay, in seconds, of a call refused with RESOURCE_EXHAUSTED."""
    with pytest.raises(client_errors.ResourceExhausted) as refused:
        await call  # type: ignore[misc]
    assert refused.value.retry_after_s is not None, "no RetryInfo with the refusal"
    return refused.value.retry_after_s


async def live(env: Env, chat_id: str, subject: str | None) -> str:
    started = await env.client.start(chat_id, [user("hi")], producer="scripted", subject=subject)
    return started.stream_id


async def test_a_subject_has_at_most_its_live_streams(env: Env) -> None:
    first, second = await live(env, "a1", ALICE), await live(env, "a2", ALICE)
    assert await exhausted(live(env, "a3", ALICE)) == 1.0
    assert await env.client.get_active("a3", subject=ALICE) is None  # nothing started
    # Others are not limited by Alice's answers, the anonymous subject only relay-wide.
    await live(env, "b1", BOB)
    for n in range(3):
        await live(env, f"anon-{n}", None)
    # Refused Starts give their reservation back: the count is still two.
    with pytest.raises(client_errors.RelayError):
        await env.client.start("b1", [user("not yours")], subject=ALICE)
    assert await exhausted(live(env, "a3", ALICE)) == 1.0
    # An answer that ends frees its place.
    stopped = await env.client.stop("a1", first, subject=ALICE)
    assert stopped.outcome is StopOutcome.STOPPED
    await live(env, "a3", ALICE)
    env.scripted.script(second).put(None)
    await collect(env.client.attach(stream_id=second, subject=ALICE))
    await live(env, "a4", ALICE)


async def test_racing_starts_of_one_subject_cannot_pass_the_limit(env: Env) -> None:
    results = await asyncio.gather(
        *(live(env, f"race-{n}", ALICE) for n in range(5)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 3
    assert all(isinstance(r, client_errors.ResourceExhausted) for r in refused)


async def test_starts_per_minute_per_subject_with_when_to_retry(env: Env) -> None:
    for n in range(4):
        started = await env.client.start(f"c{n}", [user("hi")], subject=ALICE)
        await collect(env.client.attach(stream_id=started.stream_id, subject=ALICE))
        env.clock.now += 10  # Starts at t, t+10, t+20, t+30; now t+40
    assert await exhausted(env.client.start("c9", [user("hi")], subject=ALICE)) == 20.0
    await env.client.start("b9", [user("hi")], subject=BOB)  # another subject's own budget
    env.clock.now += 20  # the first Start leaves the window
    await env.client.start("c9", [user("hi")], subject=ALICE)


async def test_a_retried_start_with_its_idempotency_key_frees_its_reservation(env: Env) -> None:
    started = await env.client.start(
        "a1", [user("hi")], producer="scripted", request_id="k1", subject=ALICE
    )
    for _ in range(2):  # the same Start again: the stream it made, no new reservation
        again = await env.client.start(
            "a1", [user("hi")], producer="scripted", request_id="k1", subject=ALICE
        )
        assert again.deduplicated and again.stream_id == started.stream_id
    await live(env, "a2", ALICE)  # the second of two


async def test_the_relay_holds_at_most_its_buffered_bytes(env: Env) -> None:
    """A hard bound: an answer that would pass it fails there (with what it had), and Starts wait
    until retention frees the finished answers, told when that will be."""
    started = await env.client.start("big", [user("word " * 2_000)])
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert end.state is StreamState.FAILED
    assert end.error_message == "the relay holds its limit of 10000 bytes of answers"
    held = sum(s.bytes for s in env.relay.streams.values())
    assert 9_000 < held <= 10_000 and len(chunks) == end.final_offset
    env.clock.now += 100
    sweep_s = env.relay.sweep_interval or 0.0
    # Retention (600 s) frees the answer 500 s from now, at the next sweep after that.
    assert await exhausted(env.client.start("next", [user("hi")])) == 500.0 + sweep_s
    env.clock.now += env.relay.retention
    await env.relay.sweep()
    await env.client.start("next", [user("hi")])


async def test_a_regenerate_at_the_limit_replaces_its_own_answer(env: Env) -> None:
    """At the live-stream limit, a superseding Start on a chat whose answer the subject runs
    takes that answer's place instead of being refused."""
    first = await live(env, "a1", ALICE)
    await live(env, "a2", ALICE)
    again = await env.client.start(
        "a1", [user("again", "u2")], producer="scripted", supersede=True, subject=ALICE
    )
    assert again.superseded_stream_id == first
    assert await exhausted(live(env, "a3", ALICE)) == 1.0
    # Supersede on a chat without a live answer of hers is a new answer: refused.
    with pytest.raises(client_errors.ResourceExhausted):
        await env.client.start(
            "a9", [user("hi")], producer="scripted", supersede=True, subject=ALICE
        )


async def test_a_start_the_store_fails_gives_its_reservation_back(tmp_path: Path) -> None:
    """The chat's binding cannot be read (disk gone): UNAVAILABLE, and the subject's reserved
    live answer is free again for the retry."""
    store, scripted = FaultyStore(tmp_path / "relay.sqlite3"), ScriptedProducer()
    relay = Relay(
        store,
        ProducerRegistry({"scripted": scripted}, "scripted"),
        Limits(live_streams_per_subject_max=1),
        sweep_interval=None,
    )
    await relay.open()
    try:
        store.fail("chat_subject", times=1)
        with pytest.raises(Unavailable):
            await relay.start(StartRequest("a1", [user("hi")]), Caller(ALICE))
        assert relay._live_by_subject == {}
        await relay.start(StartRequest("a1", [user("hi")]), Caller(ALICE))  # the retry
        with pytest.raises(ResourceExhausted):
            await relay.start(StartRequest("a2", [user("hi")]), Caller(ALICE))
    finally:
        await relay.close(grace=0)
