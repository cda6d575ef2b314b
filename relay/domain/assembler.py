"""Builds the assistant UIMessage from the UI message chunks of a stream, as the AI SDK client does.

Pure and synchronous: fed one parsed chunk at a time while the stream runs, so the message is ready
the moment the stream ends (completed, stopped or failed) without re-reading the buffer.
"""

from __future__ import annotations

from typing import Any

from relay.domain.model import EndReason, JsonObject, StreamEnd, StreamState, UIMessage

_TOOL_PART_FIELDS = ("providerExecuted", "title", "providerMetadata")


class MessageAssembler:
    def __init__(self, fallback_id: str) -> None:
        self.message_id = fallback_id
        self.parts: list[JsonObject] = []
        self.metadata: JsonObject | None = None
        # (kind, id) -> a streaming text/reasoning part and its deltas, joined only when read:
        # appending to one ever-longer string would copy it on every delta.
        self._open: dict[tuple[str, str], tuple[JsonObject, list[str]]] = {}
        self._tools: dict[str, JsonObject] = {}  # toolCallId -> tool part
        self._tool_input_text: dict[str, str] = {}

    def message(self) -> UIMessage | None:
        """The message so far, or None if the stream has produced nothing worth persisting."""
        if not self.parts and self.metadata is None:
            return None
        for part, deltas in self._open.values():
            part["text"] = "".join(deltas)
        return UIMessage(
            id=self.message_id,
            role="assistant",
            parts=[dict(p) for p in self.parts],
            metadata=dict(self.metadata) if self.metadata is not None else None,
        )

    def add(self, chunk: JsonObject) -> None:
        kind = chunk.get("type")
        if not isinstance(kind, str):
            return
        if kind == "start":
            if isinstance(chunk.get("messageId"), str):
                self.message_id = chunk["messageId"]
            self._merge_metadata(chunk.get("messageMetadata"))
        elif kind in ("finish", "message-metadata"):
            self._merge_metadata(chunk.get("messageMetadata"))
        elif kind == "start-step":
            self.parts.append({"type": "step-start"})
        elif kind in ("text-start", "reasoning-start"):
            part_type = kind.removesuffix("-start")
            part: JsonObject = {"type": part_type, "text": "", "state": "streaming"}
            _copy(chunk, part, "providerMetadata")
            self.parts.append(part)
            self._open[(part_type, str(chunk.get("id")))] = (part, [])
        elif kind in ("text-delta", "reasoning-delta"):
            found = self._open.get((kind.removesuffix("-delta"), str(chunk.get("id"))))
            if found is not None and isinstance(chunk.get("delta"), str):
                found[1].append(chunk["delta"])
        elif kind in ("text-end", "reasoning-end"):
            ended = self._open.pop((kind.removesuffix("-end"), str(chunk.get("id"))), None)
            if ended is not None:
                part, deltas = ended
                part.update(text="".join(deltas), state="done")
        elif kind.startswith("tool-"):
            self._add_tool_chunk(kind, chunk)
        elif kind in ("source-url", "source-document", "file"):
            part = {k: v for k, v in chunk.items() if k != "providerMetadata" or v is not None}
            self.parts.append(part)
        elif kind.startswith("data-") and not chunk.get("transient"):
            self._add_data_part(kind, chunk)
        # "error", "abort" and unknown types add no part.

    def _merge_metadata(self, metadata: Any) -> None:
        if isinstance(metadata, dict):
            self.metadata = {**(self.metadata or {}), **metadata}

    def _add_tool_chunk(self, kind: str, chunk: JsonObject) -> None:
        call_id = chunk.get("toolCallId")
        if not isinstance(call_id, str):
            return
        part = self._tools.get(call_id)
        if part is None:
            if kind not in ("tool-input-start", "tool-input-available", "tool-input-error"):
                return
            name = str(chunk.get("toolName", ""))
            part = (
                {"type": "dynamic-tool", "toolName": name}
                if chunk.get("dynamic")
                else {"type": f"tool-{name}"}
            )
            part.update(toolCallId=call_id, state="input-streaming", input=None)
            for key in _TOOL_PART_FIELDS:
                _copy(chunk, part, key)
            self._tools[call_id] = part
            self.parts.append(part)
        if kind == "tool-input-delta":
            text = self._tool_input_text.get(call_id, "") + str(chunk.get("inputTextDelta", ""))
            self._tool_input_text[call_id] = text
        elif kind == "tool-input-available":
            part.update(state="input-available", input=chunk.get("input"))
        elif kind == "tool-input-error":
            part.update(state="output-error", input=chunk.get("input"))
            part["errorText"] = chunk.get("errorText", "")
        elif kind == "tool-output-available":
            part.update(state="output-available", output=chunk.get("output"))
            _copy(chunk, part, "preliminary")
        elif kind == "tool-output-error":
            part.update(state="output-error", errorText=chunk.get("errorText", ""))

    def _add_data_part(self, kind: str, chunk: JsonObject) -> None:
        part: JsonObject = {"type": kind, "data": chunk.get("data")}
        if "id" in chunk:
            part["id"] = chunk["id"]
            for existing in self.parts:
                if existing["type"] == kind and existing.get("id") == chunk["id"]:
                    existing["data"] = part["data"]
                    return
        self.parts.append(part)


def _copy(source: JsonObject, target: JsonObject, key: str) -> None:
    if source.get(key) is not None:
        target[key] = source[key]


def stream_end(
    state: StreamState,
    final_offset: int,
    error: str,
    reason: EndReason,
    assembled: UIMessage | None,
    partial: UIMessage | None = None,
) -> StreamEnd:
    """A stream's end with the assistant message to persist: every path that ends a stream
    builds its end here, so a stopped, failed or interrupted answer reads the same whoever ended
    it (the producer's relay, a Stop, another relay that took it over).

    `assembled` is the message the relay built from the stream's chunks; `partial`, the one the
    client sent with its Stop, if any. COMPLETED: `assembled` as it is. Any other end:
    - the message is the client's `partial`, else `assembled`, with its open text and
      reasoning parts closed (`state: "done"`). A tool part still
      `input-streaming` stays so: its input is incomplete JSON that no later chunk will finish,
      and the AI SDK's convertToModelMessages leaves such a part out of the next request to a
      model, whereas an `output-error` part would send a tool call without a valid input;
    - its metadata is the producer's (from `assembled`), then the client's over it, except
      `usage`, the producer's report so far; then `streamEnd` = {"state", "reason"[, "error"]}
      (the state's value, the reason's label, the end's error message when it has one), so a
      reloaded page can show why the answer ended.
    No message (None) when the stream produced none and the client sent none.
    """
    end = StreamEnd(state, final_offset, error, None, reason)  # `error` made storable
    if state is StreamState.COMPLETED:
        message = assembled
    else:
        message = _ended_message(assembled, partial, end)
    return StreamEnd(state, final_offset, end.error_message, message, reason)


def _ended_message(
    assembled: UIMessage | None, partial: UIMessage | None, end: StreamEnd
) -> UIMessage | None:
    base = partial or assembled
    if base is None:
        return None
    parts = [_closed(part) for part in base.parts]
    stream_end: JsonObject = {"state": end.state.value, "reason": end.reason.label}
    if end.error_message:
        stream_end["error"] = end.error_message
    produced = (assembled.metadata if assembled is not None else None) or {}
    metadata = {**produced, **(base.metadata or {}), "streamEnd": stream_end}
    if "usage" in produced:  # the usage report is the producer's, whatever the client sent
        metadata["usage"] = produced["usage"]
    return UIMessage(base.id, base.role, parts, metadata)


def _closed(part: JsonObject) -> JsonObject:
    if part.get("type") in ("text", "reasoning") and part.get("state") == "streaming":
        return {**part, "state": "done"}
    return part
