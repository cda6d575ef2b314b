"""Message conversion: `convert_messages` turns the chat's persisted UI messages into
chat-completions messages (text, images, and each assistant step's tool calls with their
results)."""

from __future__ import annotations

from relay.domain.model import JsonObject, UIMessage, dump_json


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
