"""The `openai` producer: streams from any OpenAI-compatible chat-completions endpoint (OpenAI,
vLLM, Ollama, llama.cpp server, LiteLLM, ...) and maps its deltas to AI SDK UI message chunks.

One HTTP request per stream, opened inside the generator: when the relay cancels the producer
(Stop, supersede, shutdown) the CancelledError unwinds through `client.stream(...)`, which closes
the upstream connection at once, so the model stops generating (and billing). A reader going away
never reaches the producer, so it never touches the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import cast

import httpx

from relay import tracing
from relay.domain.errors import InvalidArgument
from relay.domain.model import JsonObject, load_json
from relay.producers import ProduceRequest, ProducerFailed, number_option, shown_names
from relay.producers.openai.chunks import Translator
from relay.producers.openai.errors import Failure, clip, error_text
from relay.producers.openai.messages import convert_messages
from relay.producers.openai.sse import EventParser
from relay.producers.profiles import Profile, ProfileError

log = logging.getLogger("relay.openai")

OPTIONS = ("model", "system", "temperature", "top_p", "max_tokens", "tools")

_ERROR_BODY_MAX = 64 * 1024  # bytes of an HTTP error body read for its message


@dataclass(frozen=True, slots=True)
class _Settings:
    model: str
    system: str
    body: JsonObject  # extra request fields: temperature, top_p, max_tokens, tools


class OpenAIProducer:
    """Streams an answer from an OpenAI-compatible `POST {base_url}/chat/completions`.

    Options (the profile's `options` are defaults; Start's options win), all strings:

    - `model`: the model name, overriding the profile's `model`.
    - `system`: a system prompt sent before the chat's messages.
    - `temperature` (0 to 2), `top_p` (0 to 1), `max_tokens` (1 to 10,000,000): sent as is.
    - `tools`: a JSON array of OpenAI tool definitions
      (`[{"type": "function", "function": {"name": ..., "parameters": {...}}}]`); the model's
      tool calls stream as `tool-input-*` chunks and the answer ends with finishReason
      `tool-calls`. The client runs the tools and sends their results with its next message.

    Unknown options or bad values are INVALID_ARGUMENT at Start. A client's Start may set only
    the options its profile's `client_options` allow (by default temperature, top_p and
    max_tokens up to 4,096; never model, system or tools): relay.producers.policy.

    The chat's persisted messages become the upstream's: text parts joined into `content`; each
    assistant step's tool parts with a result (output-available / output-error) become
    `tool_calls` plus one `tool` message each (a string output as is, any other output as JSON,
    an error as its text); tool calls without a result, reasoning, step-start, source, data and
    file parts are left out (images in user messages are sent as `image_url` parts).
    """

    def __init__(
        self,
        base_url: str,
        model: str = "",
        *,
        api_key: str = "",
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        options: Mapping[str, str] | None = None,
    ) -> None:
        url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.url = url
        # Where errors say we connected: no credentials, no query.
        self.where = str(url.copy_with(username=None, password=None, query=None))
        self.model = model
        self._api_key = api_key  # never logged, never part of a chunk or an error
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.defaults = dict(options or {})
        self._resolve({})  # the defaults alone must be valid
        # One pooled HTTP client for every stream of this profile (connections kept alive and
        # reused), made in the event loop that first needs it; `close` closes it.
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_profile(cls, profile: Profile) -> OpenAIProducer:
        """Builds the producer of an `openai` profile; the API key is read from the environment
        variable the profile names, now. A missing variable or a bad field is a ProfileError."""
        where = f"producer {profile.name!r}"
        api_key = ""
        if profile.api_key_env:
            api_key = os.environ.get(profile.api_key_env, "")
            if not api_key:
                raise ProfileError(
                    f"{where}: the environment variable {profile.api_key_env} (api_key_env) "
                    "is not set"
                )
        for key in ("connect_timeout_s", "idle_timeout_s"):
            value = getattr(profile, key)
            if not (math.isfinite(value) and value > 0):
                raise ProfileError(f"{where}: {key} must be more than 0")
        try:
            return cls(
                profile.base_url,
                profile.model,
                api_key=api_key,
                connect_timeout_s=profile.connect_timeout_s,
                idle_timeout_s=profile.idle_timeout_s,
                options=profile.options,
            )
        except (ValueError, InvalidArgument) as exc:
            raise ProfileError(f"{where}: {exc}") from None

    def check_options(self, options: Mapping[str, str]) -> None:
        self._resolve(options)

    def _resolve(self, options: Mapping[str, str]) -> _Settings:
        merged = {**self.defaults, **options}
        unknown = set(merged) - set(OPTIONS)
        if unknown:
            raise InvalidArgument(
                f"openai producer: unknown options {shown_names(unknown)}; "
                f"known: {', '.join(OPTIONS)}"
            )
        body: JsonObject = {}
        for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            if key in merged:
                body[key] = number_option("openai", key, merged[key], float, low, high)
        if "max_tokens" in merged:
            body["max_tokens"] = number_option(
                "openai", "max_tokens", merged["max_tokens"], int, 1, 10**7
            )
        if "tools" in merged:
            body["tools"] = _tools(merged["tools"])
        model = merged.get("model", self.model)
        if not model:
            raise InvalidArgument(
                "openai producer: no model; set `model` in the profile or the `model` option"
            )
        return _Settings(model, merged.get("system", ""), body)

    def request_body(self, request: ProduceRequest) -> JsonObject:
        settings = self._resolve(request.options)
        messages = convert_messages(request.messages)
        if settings.system:
            messages.insert(0, {"role": "system", "content": settings.system})
        return {
            "model": settings.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **settings.body,
        }

    async def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
        payload = self.request_body(request)
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        chunks = Translator(request.stream_id, payload["model"])
        yield chunks.start()
        client = self._client_in_this_loop()
        loop, idle = asyncio.get_running_loop(), self.idle_timeout_s
        failure = ""
        try:
            # Until the response's head, httpx's connect and read timeouts bound the wait; from
            # then on the idle timeout counts data events only: an upstream that sends nothing
            # but SSE comments (`: ping`) for that long has stopped answering.
            async with (
                asyncio.timeout(None) as deadline,
                client.stream("POST", self.url, json=payload, headers=headers) as response,
            ):
                deadline.reschedule(loop.time() + idle)
                if not response.is_success:
                    raise Failure(await _http_error(response))
                yield chunks.start_step()
                events = EventParser()
                body = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
                async with aclosing(body):
                    async for piece in body:
                        parsed = events.feed(piece)
                        if parsed:
                            deadline.reschedule(loop.time() + idle)
                        for kind, data in parsed:
                            for chunk in chunks.event(kind, data):
                                yield chunk
                        if chunks.done:
                            break
                    else:
                        for kind, data in events.close():
                            for chunk in chunks.event(kind, data):
                                yield chunk
                        if not chunks.done and chunks.finish_reason is None:
                            # Some servers omit [DONE]; but without a finish reason either, the
                            # answer was cut off.
                            content_type = response.headers.get("content-type", "")
                            raise Failure(
                                "the upstream closed the stream before the answer finished"
                                + ("" if "event-stream" in content_type else f" ({content_type!r})")
                            )
                    if chunks.done:  # [DONE]: the answer's end goes out, then the body's is read
                        for chunk in chunks.finish():
                            yield chunk
                        deadline.reschedule(None)  # no data is due after [DONE]
                        await _drain(body, min(DRAIN_S, idle))
                        return
                for chunk in chunks.finish():
                    yield chunk
        except Failure as exc:
            failure = str(exc)
        except httpx.ConnectTimeout:
            failure = (
                f"could not connect to the upstream at {self.where} within "
                f"{self.connect_timeout_s:g} s"
            )
        except httpx.ConnectError as exc:
            failure = f"could not connect to the upstream at {self.where}: {_describe(exc)}"
        except (TimeoutError, httpx.TimeoutException):
            failure = (
                f"the upstream at {self.where} sent nothing for {self.idle_timeout_s:g} s "
                "(idle timeout)"
            )
        except httpx.HTTPError as exc:
            failure = f"the connection to the upstream at {self.where} failed: {_describe(exc)}"
        if failure:
            failure = self._redact(failure)
            log.warning(
                "upstream failed",
                extra={"stream_id": request.stream_id, "upstream": self.where, "error": failure},
            )
            yield {"type": "error", "errorText": failure}
            raise ProducerFailed(failure)

    def _client_in_this_loop(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._loop.is_closed():
            self._client = httpx.AsyncClient(
                # The read timeout bounds the wait for the response's head (and each read);
                # `generate` bounds the wait for each data event.
                timeout=httpx.Timeout(self.idle_timeout_s, connect=self.connect_timeout_s),
                # As many answers at once as the relay runs: no pool limit to queue behind.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
            tracing.instrument_httpx(self._client)  # a span per request when tracing is on
            self._loop = loop
        return self._client

    async def close(self) -> None:
        """Closes the pooled client (the relay's shutdown); the next stream makes another."""
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.aclose()

    def _redact(self, text: str) -> str:
        # An upstream may echo the key back in an error; it must not reach chunks or the store.
        return text.replace(self._api_key, "[redacted]") if self._api_key else text


# How long the rest of a body after [DONE] may take before its connection is dropped: the
# stream's end waits for it (normally the body ends with [DONE] and this costs nothing).
DRAIN_S = 0.25


async def _drain(body: AsyncGenerator[bytes, None], seconds: float) -> None:
    """Reads what follows [DONE] (normally just the body's end): a connection whose body was read
    to the end goes back to the pool; one cut short is closed."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(seconds):
            async for _ in body:
                pass


async def _http_error(response: httpx.Response) -> str:
    body = b""
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= _ERROR_BODY_MAX:
            break
    text = body.decode("utf-8", "replace").strip()
    try:
        message = error_text(load_json(text))
    except ValueError:
        message = clip(text) if text else response.reason_phrase
    return f"upstream HTTP {response.status_code}: {message}"


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _tools(raw: str) -> list[JsonObject]:
    try:
        tools = load_json(raw)
    except ValueError as exc:
        raise InvalidArgument(f"openai producer: tools is not valid JSON ({exc})") from None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("type"), str) for t in tools
    ):
        raise InvalidArgument(
            "openai producer: tools must be a JSON array of tool objects, each with a 'type'"
        )
    return tools
