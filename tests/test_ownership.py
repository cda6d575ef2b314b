"""Chats belong to the subject whose Start created them: every RPC by another subject on such a
chat is answered exactly as for a chat that does not exist, and changes nothing."""

from __future__ import annotations

import json

import grpc
import pytest

from relay.client import ReaderRefused, RelayClient
from relay.domain.model import StopOutcome, StreamState, UIMessage
from tests.conftest import Env, collect, read_chunks, text_chunks, user

ALICE, BOB = "alice@example.com", "bob"


@pytest.fixture(params=["embedded", "cluster"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call was not refused")


async def attach_refusal(
    client: RelayClient, subject: str | None, *, chat_id: str = "", stream_id: str = ""
) -> tuple[grpc.StatusCode, str]:
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
        assert (code, detail) == (grpc.StatusCode.NOT_FOUND, "chat 'c' not found")
        # Attach, by chat and by stream: the very answers a missing chat and stream get.
        code, detail = await attach_refusal(client, intruder, chat_id="c")
        missing = await attach_refusal(client, intruder, chat_id="no-such-chat")
        assert (code, detail.replace("'c'", "'no-such-chat'")) == missing
        code, detail = await attach_refusal(client, intruder, stream_id=stream_id)
        missing = await attach_refusal(client, intruder, stream_id=unknown_stream)
        assert (code, detail.replace(stream_id, unknown_stream)) == missing
        assert code is grpc.StatusCode.NOT_FOUND
        # AttachMany: the call's subject, and a subscription naming its own.
        async with client.attach_many(subject=intruder) as readers:
            readers.subscribe(1, chat_id="c")
            readers.subscribe(2, stream_id=stream_id)
            readers.subscribe(3, chat_id="c", subject=BOB)
            readers.done_subscribing()
            refused = {tag: event async for tag, event in readers}
        assert all(
            isinstance(e, ReaderRefused) and e.code is grpc.StatusCode.NOT_FOUND
            for e in refused.values()
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


async def test_a_subject_over_the_limit_is_invalid(env: Env) -> None:
    code, detail = await refusal(env.client.get_active("c", subject="x" * 257))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "256" in detail
