"""The `grpc` producer: the answer comes from a ProducerService (protos/relay/v1/producer.proto)
that any language can implement. The relay dials the profile's target and owns the call.

    [producers.backend]
    kind = "grpc"
    target = "127.0.0.1:50061"
    connect_timeout_s = 5
    idle_timeout_s = 60
    options = { delay_ms = "20" }          # defaults under Start's options
    token_env = "BACKEND_TOKEN"            # sent as `authorization: Bearer <token>`
    tls_ca = "backend-ca.pem"              # TLS, the backend's certificate checked against it
    tls_cert = "relay.pem"                 # with tls_key: a client certificate (mutual TLS)
    tls_key = "relay-key.pem"

Cancellation: when the relay cancels the producer (Stop, supersede, shutdown), the Generate call is
cancelled at once, so the backend sees a cancelled context. A reader disconnecting never reaches
the backend: readers follow the relay's buffer, not the call.

Each GenerateResponse's chunks reach the relay as one batch (relay.producers.Producer): appended
at once, with the limits of single chunks.

With `multiplex = true` a profile's answers share one GenerateMany call instead, with the same
settings and errors: relay.producers.grpc_many.

Failures (target unreachable, no connection within connect_timeout_s, a non-OK status from the
backend, a chunk that is not a JSON object with a string `type`, a response over the channel's
64 MiB message limit, nothing received for idle_timeout_s) each yield an `error` chunk and raise
ProducerFailed with the same message: the stream ends FAILED and its partial message is
persisted. A chunk over the relay's limits fails the stream too (relay.domain.core).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any

import grpc

from relay.client import ClientTLS, open_channel
from relay.domain.errors import InvalidArgument
from relay.domain.model import JsonObject, load_json, shown
from relay.producers import ProduceRequest, ProducerFailed
from relay.producers.profiles import Profile, ProfileError
from relay.rpc.auth import AUTHORIZATION_METADATA, check_token
from relay.rpc.convert import message_to_pb
from relay.v1 import producer_pb2

GENERATE_METHOD = "/relay.v1.ProducerService/Generate"

OPTIONS_MAX = 64  # after the profile's defaults are merged under Start's options
OPTION_KEY_MAX_CHARS = 128
OPTION_VALUE_MAX_CHARS = 4_096
MESSAGE_MAX_BYTES = 64 << 20  # the relay bounds a stream at 64 MiB by default
_RECONNECT_BACKOFF_MS = 1_000  # the longest pause between two connection attempts
_RECONNECT_WAIT_S = 1.5  # how long a Start waits for a failed channel's next attempt
_SHOWN_CHARS = 120  # how much of a malformed chunk an error message quotes
# gRPC's status details when a message is over the channel's max receive size.
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. \d+\)")

_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


class GrpcProducer:
    """Streams an answer from a remote ProducerService over one lazily created grpc.aio channel."""

    def __init__(
        self,
        target: str,
        *,
        name: str = "grpc",
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        options: Mapping[str, str] | None = None,
        token: str | None = None,
        tls: ClientTLS | None = None,
        message_max_bytes: int = MESSAGE_MAX_BYTES,
    ) -> None:
        """`token`: sent as `authorization: Bearer` on every call. `tls`: TLS (mutual with a
        client certificate) to the backend; None is plaintext. Its files are read now: a bad
        one is a ProfileError. `message_max_bytes`: the largest GenerateResponse the relay
        takes (gRPC refuses a larger one, and the stream fails saying so)."""
        if not target:
            raise ProfileError(f'producer {name!r}: kind "grpc" needs a target (host:port)')
        if connect_timeout_s <= 0 or idle_timeout_s <= 0:
            raise ProfileError(f"producer {name!r}: timeouts must be positive")
        self.target = target
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.default_options = dict(options or {})
        self.message_max_bytes = message_max_bytes
        self._metadata: tuple[tuple[str, str], ...] = ()
        if token is not None:
            try:
                check_token(token)
            except ValueError as exc:
                raise ProfileError(f"producer {name!r}: {exc}") from None
            self._metadata = ((AUTHORIZATION_METADATA, f"Bearer {token}"),)
        if tls is not None:
            try:
                tls.credentials()
            except ValueError as exc:
                raise ProfileError(f"producer {name!r}: {exc}") from None
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_profile(cls, profile: Profile, env: Mapping[str, str] | None = None) -> GrpcProducer:
        env = os.environ if env is None else env
        token = None
        if profile.token_env:
            token = env.get(profile.token_env, "")
            if not token:
                raise ProfileError(
                    f"producer {profile.name!r}: token_env: the variable {profile.token_env} "
                    "is not set"
                )
        tls = None
        if profile.tls_ca or profile.tls_cert or profile.tls_key:
            tls = ClientTLS(
                ca=profile.tls_ca or None,
                cert=profile.tls_cert or None,
                key=profile.tls_key or None,
            )
        return cls(
            profile.target,
            name=profile.name,
            connect_timeout_s=profile.connect_timeout_s,
            idle_timeout_s=profile.idle_timeout_s,
            options=profile.options,
            token=token,
            tls=tls,
        )

    def check_options(self, options: Mapping[str, str]) -> None:
        """Any string options pass (the backend validates them), within bounds."""
        merged = {**self.default_options, **options}
        if len(merged) > OPTIONS_MAX:
            raise InvalidArgument(f"{self._who}: more than {OPTIONS_MAX} options")
        for key, value in merged.items():
            if not key or len(key) > OPTION_KEY_MAX_CHARS:
                raise InvalidArgument(
                    f"{self._who}: option names must be 1 to {OPTION_KEY_MAX_CHARS} characters"
                )
            if len(value) > OPTION_VALUE_MAX_CHARS:
                raise InvalidArgument(
                    f"{self._who}: option {shown(key)} is longer than {OPTION_VALUE_MAX_CHARS} "
                    "characters"
                )

    async def generate(
        self, request: ProduceRequest
    ) -> AsyncGenerator[JsonObject | list[JsonObject], None]:
        """Each GenerateResponse's chunks as one batch; a failure as an `error` chunk."""
        message = self._generate_request(request)
        channel = self._channel_in_this_loop()
        failure = await self._connect(channel)
        if failure:
            yield _error_chunk(failure)
            raise ProducerFailed(failure)
        generate = channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=producer_pb2.GenerateRequest.SerializeToString,
            response_deserializer=producer_pb2.GenerateResponse.FromString,
        )
        call = generate(message, metadata=self._metadata, wait_for_ready=False)
        idle = _IdleWatch(call, self.idle_timeout_s)
        try:
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if not idle.fired or (current is not None and current.cancelling()):
                        raise  # Stop, supersede, shutdown
                    break  # the idle timeout: below
                except grpc.aio.AioRpcError as exc:
                    failure = self._status_failure(exc.code(), exc.details())
                    break
                idle.last = idle.loop.time()
                # grpc.aio.EOF: the call ended (isinstance: the stubs type read() as object).
                if not isinstance(response, producer_pb2.GenerateResponse):
                    code = await call.code()
                    if code is not grpc.StatusCode.OK:  # read() raises first; in case it did not
                        failure = self._status_failure(code, await call.details())
                    break
                # A response's chunks are one batch; a malformed one ends the call, the chunks
                # before it kept.
                batch, failure = self._parse_batch(response.chunks)
                if batch:  # none: a keep-alive
                    yield batch
                if failure:
                    break
            if idle.fired:  # it cancelled the call, however the read ended
                failure = self._idle_failure
        finally:
            idle.close()
            # Stop, supersede or shutdown (CancelledError, then the relay closes this generator),
            # or a failure: the backend must not go on for nobody.
            if not call.done():
                call.cancel()
        if failure:
            yield _error_chunk(failure)
            raise ProducerFailed(failure)

    async def close(self) -> None:
        """Closes the channel (cancelling calls still on it). The next generate dials again."""
        channel, self._channel, self._loop = self._channel, None, None
        if channel is not None:
            await channel.close()

    # -- helpers -----------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        return f"grpc producer {self.name!r} ({self.target})"

    @property
    def _idle_failure(self) -> str:
        return f"{self._who} sent nothing for {self.idle_timeout_s:g} s (idle timeout)"

    def _generate_request(self, request: ProduceRequest) -> producer_pb2.GenerateRequest:
        """The GenerateRequest of an answer: its options the profile's under Start's."""
        return producer_pb2.GenerateRequest(
            chat_id=request.chat_id,
            stream_id=request.stream_id,
            messages=[message_to_pb(m) for m in request.messages],
            options={**self.default_options, **request.options},
        )

    def _parse_batch(self, texts: Iterable[str]) -> tuple[list[JsonObject], str]:
        """The chunks of one response as a batch, up to the first malformed one, and what is
        wrong with that one ("" when none is)."""
        batch: list[JsonObject] = []
        for text in texts:
            chunk = _parse_chunk(text)
            if isinstance(chunk, str):
                return batch, f"{self._who} sent a chunk that {chunk}: {_shorten(text)}"
            batch.append(chunk)
        return batch, ""

    def _channel_in_this_loop(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop or self._loop.is_closed():
            # A grpc.aio channel belongs to the loop it was made in: make one per running loop.
            self._channel = open_channel(
                self.target,
                [
                    ("grpc.max_receive_message_length", self.message_max_bytes),
                    ("grpc.max_send_message_length", self.message_max_bytes),
                    # A restarted backend is found again within a second, not after minutes of
                    # exponential backoff during which every Start would fail at once.
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS),
                ],
                self.tls,
            )
            self._loop = loop
        return self._channel

    async def _connect(self, channel: grpc.aio.Channel) -> str:
        """Waits until the channel is ready or a connection attempt has failed; a failed attempt
        (a refused connection fails at once) lets the call fail fast with UNAVAILABLE and gRPC's
        reason. Returns why it gave up when an attempt hangs for connect_timeout_s."""
        state = channel.get_state(try_to_connect=True)
        if state is _FAILED:
            # Failed before and backing off (it stays TRANSIENT_FAILURE until READY): give a
            # restarted backend one reconnect to come back, then fail fast.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.connect_timeout_s, _RECONNECT_WAIT_S)):
                    while state is _FAILED:
                        await channel.wait_for_state_change(state)
                        state = channel.get_state(try_to_connect=True)
            return ""
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                while state is not _READY and state is not _FAILED:
                    if state is _SHUTDOWN:
                        return f"{self._who}: the channel is closed"
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            return f"{self._who}: no connection within {self.connect_timeout_s:g} s"
        return ""

    def _status_failure(self, code: grpc.StatusCode, details: str | None) -> str:
        status = f"{code.name}: {details or 'no details'}"
        too_large = _TOO_LARGE.search(details or "")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and too_large:
            # The relay's channel refused the response (gRPC's own words are about a "stream").
            return (
                f"{self._who} sent a response of {too_large[1]} bytes, over the relay's limit of "
                f"{self.message_max_bytes} bytes per response ({status})"
            )
        return f"{self._who} failed: {status}"


class _IdleWatch:
    """Cancels `call` once nothing has come for `seconds` (its read then raises CancelledError,
    `fired` telling it from the relay's own cancel; anything with a `cancel()` will do). One timer
    per call, re-armed only when it fires early: a read just notes the time, far cheaper than a
    timeout around each read."""

    def __init__(self, call: Any, seconds: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.call = call
        self.seconds = seconds
        self.last = self.loop.time()  # when the last response came
        self.fired = False
        self._timer = self.loop.call_at(self.last + seconds, self._check)

    def _check(self) -> None:
        due = self.last + self.seconds
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check)
        else:
            self.fired = True
            self.call.cancel()

    def close(self) -> None:
        self._timer.cancel()


def _parse_chunk(text: str) -> JsonObject | str:
    """The chunk, or what is wrong with it."""
    try:
        chunk: Any = load_json(text)
    except ValueError as exc:
        return f"is not a JSON object with a string 'type' (not valid JSON: {exc})"
    if not isinstance(chunk, dict) or not isinstance(chunk.get("type"), str):
        return "is not a JSON object with a string 'type'"
    return chunk


def _shorten(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _error_chunk(message: str) -> JsonObject:
    return {"type": "error", "errorText": message}
