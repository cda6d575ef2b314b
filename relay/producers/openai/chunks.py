"""The chunk translator: `Translator` turns the upstream's parsed chat-completions events (text,
reasoning and tool-call deltas, finish reason, usage) into AI SDK UI message chunks, keeping which
parts are open."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.domain.model import JsonObject, load_json
from relay.producers.openai.errors import Failure, clip, error_text

# The portable AI SDK finish reasons; anything else upstream is "other".
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
    "error": "error",
}


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    done: bool = False


class Translator:
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
            raise Failure(f"upstream error: {error_text(error)}")
        if isinstance(event.get("model"), str) and event["model"]:
            self.model = event["model"]
        if isinstance(event.get("usage"), dict):
            self.usage = _usage(event["usage"])
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise Failure("malformed upstream data: `choices` is not a list")
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


def _parse(event: str, data: str) -> JsonObject:
    try:
        value = load_json(data)
    except ValueError:
        if event == "error":
            raise Failure(f"upstream error: {clip(data)}") from None
        raise Failure(f"malformed upstream data (not JSON): {clip(data)}") from None
    if event == "error":
        raise Failure(f"upstream error: {error_text(value)}")
    if not isinstance(value, dict):
        raise Failure(f"malformed upstream data (not a JSON object): {clip(data)}")
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
