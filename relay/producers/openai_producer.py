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
import re
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import httpx

from relay.domain.errors import InvalidArgument
from relay.domain.model import JsonObject, UIMessage, dump_json, load_json
from relay.producers import ProduceRequest, ProducerFailed, number_option, shown_names
from relay.producers.profiles import Profile, ProfileError

log = logging.getLogger("relay.openai")

OPTIONS = ("model", "system", "temperature", "top_p", "max_tokens", "tools")

# The portable AI SDK finish reasons; anything else upstream is "other".
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
    "error": "error",
}

_ERROR_BODY_MAX = 64 * 1024  # bytes of an HTTP error body read for its message


class _Failure(Exception):
    """The upstream misbehaved; the message is what the stream fails with."""


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
        chunks = _Translator(request.stream_id, payload["model"])
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
                    raise _Failure(await _http_error(response))
                yield chunks.start_step()
                events = _EventParser()
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
                            raise _Failure(
                                "the upstream closed the stream before the answer finished"
                                + ("" if "event-stream" in content_type else f" ({content_type!r})")
                            )
                    if chunks.done:  # [DONE]: read to the body's end, so the connection is reused
                        await _drain(body)
                for chunk in chunks.finish():
                    yield chunk
        except _Failure as exc:
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


# -- upstream -> UI chunks -----------------------------------------------------------------------


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    done: bool = False


class _Translator:
    """Turns parsed upstream events into UI chunks; keeps which parts are open."""

    def __init__(self, stream_id: str, model: str) -> None:
        self.stream_id = stream_id
        self.model = model
        self.text_id: str | None = None
        self.reasoning_id: str | None = None
        self.parts = 0  # ids handed out: t0, r1, t2, ...
        self.calls: dict[int, _ToolCall] = {}
        self.all_calls: list[_ToolCall] = []
        self.finish_reason: str | None = None
        self.usage: JsonObject | None = None
        self.done = False  # [DONE] arrived; anything after it is ignored

    def start(self) -> JsonObject:
        return {"type": "start", "messageId": f"msg_{self.stream_id}"}

    def start_step(self) -> JsonObject:
        return {"type": "start-step"}

    def event(self, kind: str, data: str) -> list[JsonObject]:
        """The UI chunks of one upstream event (`kind` is its SSE event type, usually empty)."""
        if self.done:
            return []
        if data == "[DONE]":
            self.done = True
            return []
        event = _parse(kind, data)
        error = event.get("error")
        if error:
            raise _Failure(f"upstream error: {_error_text(error)}")
        if isinstance(event.get("model"), str) and event["model"]:
            self.model = event["model"]
        if isinstance(event.get("usage"), dict):
            self.usage = _usage(event["usage"])
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise _Failure("malformed upstream data: `choices` is not a list")
        out: list[JsonObject] = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # only the first choice is relayed
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason
                self._end_calls(out)
        return out

    def _delta(self, delta: JsonObject, out: list[JsonObject]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self._close_text(out)
            if self.reasoning_id is None:
                self.reasoning_id = self._next_id("r")
                out.append({"type": "reasoning-start", "id": self.reasoning_id})
            out.append({"type": "reasoning-delta", "id": self.reasoning_id, "delta": reasoning})
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._close_reasoning(out)
            if self.text_id is None:
                self.text_id = self._next_id("t")
                out.append({"type": "text-start", "id": self.text_id})
            out.append({"type": "text-delta", "id": self.text_id, "delta": content})
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, tool_call in enumerate(tool_calls):
                if isinstance(tool_call, dict):
                    self._tool_delta(position, tool_call, out)

    def _tool_delta(self, position: int, delta: JsonObject, out: list[JsonObject]) -> None:
        index = delta.get("index")
        index = index if isinstance(index, int) else position
        function = delta.get("function")
        function = function if isinstance(function, dict) else {}
        call_id = delta.get("id")
        call = self.calls.get(index)
        # A new call: a first delta at this index, or (some servers) another id at the same index.
        if call is None or (isinstance(call_id, str) and call_id and call_id != call.id):
            if call is not None:
                self._end_call(call, out)
            self._close_text(out)
            self._close_reasoning(out)
            name = function.get("name")
            call = _ToolCall(
                call_id if isinstance(call_id, str) and call_id else self._next_call_id(),
                name if isinstance(name, str) else "",
            )
            self.calls[index] = call
            self.all_calls.append(call)
            out.append({"type": "tool-input-start", "toolCallId": call.id, "toolName": call.name})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments and not call.done:
            call.arguments.append(arguments)
            out.append(
                {"type": "tool-input-delta", "toolCallId": call.id, "inputTextDelta": arguments}
            )

    def _end_calls(self, out: list[JsonObject]) -> None:
        for call in self.all_calls:
            self._end_call(call, out)

    def _end_call(self, call: _ToolCall, out: list[JsonObject]) -> None:
        if call.done:
            return
        call.done = True
        text = "".join(call.arguments)
        try:
            parsed = load_json(text) if text.strip() else {}
        except ValueError as exc:
            out.append(
                {
                    "type": "tool-input-error",
                    "toolCallId": call.id,
                    "toolName": call.name,
                    "input": text,
                    "errorText": f"the model's tool arguments are not valid JSON: {exc}",
                }
            )
            return
        out.append(
            {
                "type": "tool-input-available",
                "toolCallId": call.id,
                "toolName": call.name,
                "input": parsed,
            }
        )

    def finish(self) -> list[JsonObject]:
        out: list[JsonObject] = []
        self._close_text(out)
        self._close_reasoning(out)
        self._end_calls(out)
        metadata: JsonObject = {"model": self.model}
        if self.usage:
            metadata = {"usage": self.usage, **metadata}
        reason = FINISH_REASONS.get(self.finish_reason or "", "other")
        out.append({"type": "finish-step"})
        out.append({"type": "finish", "finishReason": reason, "messageMetadata": metadata})
        return out

    def _close_text(self, out: list[JsonObject]) -> None:
        if self.text_id is not None:
            out.append({"type": "text-end", "id": self.text_id})
            self.text_id = None

    def _close_reasoning(self, out: list[JsonObject]) -> None:
        if self.reasoning_id is not None:
            out.append({"type": "reasoning-end", "id": self.reasoning_id})
            self.reasoning_id = None

    def _next_id(self, prefix: str) -> str:
        part_id = f"{prefix}{self.parts}"
        self.parts += 1
        return part_id

    def _next_call_id(self) -> str:
        return f"call_{self.stream_id[:12]}_{len(self.all_calls)}"


_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_MAX = 4 * 1024 * 1024


class _EventParser:
    """Server-sent events from raw body bytes: `feed` returns the (event type, data) of each event
    a blank line completes. Lines end at CRLF, LF or CR only (not at the other characters
    `str.splitlines` breaks on, which a model's text may hold). Comments, `id:` and `retry:` are
    ignored."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []  # the current line so far
        self._size = 0
        self._after_cr = False  # the last piece ended with CR: skip an LF that starts the next
        self._event = ""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        start = 1 if self._after_cr and piece.startswith(b"\n") else 0
        self._after_cr = False
        for end in _LINE_END.finditer(piece, start):
            self._pieces.append(piece[start : end.start()])
            line = b"".join(self._pieces).decode("utf-8", "replace")
            self._pieces, self._size = [], 0
            self._line(line, events)
            start = end.end()
            self._after_cr = end.group() == b"\r" and start == len(piece)
        if start < len(piece):
            self._pieces.append(piece[start:])
            self._size += len(piece) - start
            if self._size > _LINE_MAX:
                raise _Failure(f"malformed upstream data: a line over {_LINE_MAX} bytes")
        return events

    def close(self) -> list[tuple[str, str]]:
        """The body ended: an event it left without its blank line still counts."""
        events: list[tuple[str, str]] = []
        if self._pieces:
            self._line(b"".join(self._pieces).decode("utf-8", "replace"), events)
            self._pieces = []
        self._line("", events)
        return events

    def _line(self, line: str, events: list[tuple[str, str]]) -> None:
        if line == "":
            if self._data:
                events.append((self._event, "\n".join(self._data)))
            self._event, self._data = "", []
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value


def _parse(event: str, data: str) -> JsonObject:
    try:
        value = load_json(data)
    except ValueError:
        if event == "error":
            raise _Failure(f"upstream error: {_clip(data)}") from None
        raise _Failure(f"malformed upstream data (not JSON): {_clip(data)}") from None
    if event == "error":
        raise _Failure(f"upstream error: {_error_text(value)}")
    if not isinstance(value, dict):
        raise _Failure(f"malformed upstream data (not a JSON object): {_clip(data)}")
    return value


def _usage(usage: JsonObject) -> JsonObject:
    out: JsonObject = {}
    for source, target in (
        ("prompt_tokens", "inputTokens"),
        ("completion_tokens", "outputTokens"),
        ("total_tokens", "totalTokens"),
    ):
        if isinstance(usage.get(source), int):
            out[target] = usage[source]
    for details, source, target in (
        ("completion_tokens_details", "reasoning_tokens", "reasoningTokens"),
        ("prompt_tokens_details", "cached_tokens", "cachedInputTokens"),
    ):
        value = usage.get(details)
        if isinstance(value, dict) and isinstance(value.get(source), int):
            out[target] = value[source]
    return out


DRAIN_S = 1.0  # how long the rest of a body after [DONE] may take before its connection is dropped


async def _drain(body: AsyncGenerator[bytes, None]) -> None:
    """Reads what follows [DONE] (normally just the body's end): a connection whose body was read
    to the end goes back to the pool; one cut short is closed."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(DRAIN_S):
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
        message = _error_text(load_json(text))
    except ValueError:
        message = _clip(text) if text else response.reason_phrase
    return f"upstream HTTP {response.status_code}: {message}"


def _error_text(error: Any) -> str:
    """The message of an upstream error, in the shapes servers use: OpenAI's
    `{"error": {"message"}}`, `{"error": "..."}`, vLLM's `{"message"}`, FastAPI's `{"detail"}`."""
    if isinstance(error, dict):
        for key in ("error", "message", "detail"):
            value = error.get(key)
            if isinstance(value, str) and value:
                return _clip(value)
            if isinstance(value, dict | list) and value:
                return _error_text(value)
    if isinstance(error, str) and error:
        return _clip(error)
    return _clip(dump_json(error))


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


# -- UI messages -> upstream messages ------------------------------------------------------------


def convert_messages(messages: list[UIMessage]) -> list[JsonObject]:
    """The chat's UI messages (oldest first) as chat-completions messages."""
    out: list[JsonObject] = []
    for message in messages:
        if message.role == "assistant":
            out.extend(_assistant_messages(message.parts))
        elif message.role == "user":
            content = _user_content(message.parts)
            if content:
                out.append({"role": "user", "content": content})
        else:
            text = "\n\n".join(_texts(message.parts))
            if text:
                out.append({"role": message.role, "content": text})
    return out


def _texts(parts: list[JsonObject]) -> list[str]:
    return [p["text"] for p in parts if p.get("type") == "text" and isinstance(p.get("text"), str)]


def _user_content(parts: list[JsonObject]) -> str | list[JsonObject]:
    images = [
        p["url"]
        for p in parts
        if p.get("type") == "file"
        and str(p.get("mediaType", "")).startswith("image/")
        and isinstance(p.get("url"), str)
    ]
    if not images:
        return "\n\n".join(_texts(parts))
    content: list[JsonObject] = []
    for part in parts:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            content.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "file" and part.get("url") in images:
            content.append({"type": "image_url", "image_url": {"url": part["url"]}})
    return content


def _assistant_messages(parts: list[JsonObject]) -> list[JsonObject]:
    """One assistant message per step (its text and tool calls), each followed by the results of
    its tool calls, as the AI SDK converts them."""
    out: list[JsonObject] = []
    texts: list[str] = []
    calls: list[JsonObject] = []
    results: list[JsonObject] = []

    def flush() -> None:
        if texts or calls:
            message: JsonObject = {"role": "assistant", "content": "".join(texts)}
            if calls:
                message["tool_calls"] = list(calls)
            out.append(message)
            out.extend(results)
        texts.clear()
        calls.clear()
        results.clear()

    for part in parts:
        kind = part.get("type")
        if kind == "step-start":
            flush()
        elif kind == "text" and isinstance(part.get("text"), str):
            if calls:  # text after tool calls without a step-start: a new step all the same
                flush()
            texts.append(part["text"])
        elif isinstance(kind, str) and (kind.startswith("tool-") or kind == "dynamic-tool"):
            call = _tool_call(kind, part)
            if call is not None:
                calls.append(call[0])
                results.append(call[1])
    flush()
    return out


def _tool_call(kind: str, part: JsonObject) -> tuple[JsonObject, JsonObject] | None:
    """A tool part with a result as (its tool call, its tool message); None without a result:
    an upstream refuses a tool call that no tool message answers."""
    call_id = part.get("toolCallId")
    state = part.get("state")
    if not isinstance(call_id, str) or state not in ("output-available", "output-error"):
        return None
    name = part.get("toolName") if kind == "dynamic-tool" else kind.removeprefix("tool-")
    tool_input = part.get("input")
    arguments = tool_input if isinstance(tool_input, str) else dump_json(tool_input or {})
    if state == "output-available":
        output = part.get("output")
        content = output if isinstance(output, str) else dump_json(output)
    else:
        content = str(part.get("errorText") or "the tool failed")
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": str(name or ""), "arguments": arguments},
    }
    return call, {"role": "tool", "tool_call_id": call_id, "content": content}


# -- options -------------------------------------------------------------------------------------


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
