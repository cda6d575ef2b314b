"""Replays that parse from an empty message: compacted, and part-safe.

A stock AI SDK client resumes an answer from an empty message (ai 6 and 7 reset their state at
the first `start` chunk of a resume; ai 5 starts from an empty one), so what a resume sends must
build the whole message on its own. Two ways to send what a stream already holds:

- compacted: each run of consecutive deltas of one part (`text-delta`, `reasoning-delta`,
  `tool-input-delta`) is merged into one delta. A client parsing it ends with the message the
  plain chunks build: the merged delta appends what the run appended, nothing else changes.
- part-safe: a resume from offset k > 0 is prefixed with the chunks [0, k) compacted, a snapshot
  of the message as of chunk k - 1 with its open parts left open, so the chunks from k never start
  with a bare delta whose part the client has not seen.

Each chunk sent carries the offset of the last stream chunk it stands for (its SSE id): a reader
that stops anywhere resumes after it, and the snapshot it then gets covers the same message.

Only deltas holding nothing but the type, the part's id and the text are merged (others carry
provider metadata a client keeps per delta), and a merged text stays under MERGED_MAX_CHARS so a
compacted chunk never grows past what one gRPC message or SSE event should carry.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.domain.model import ChunkBatch, dump_json, load_json

MERGED_MAX_CHARS = 64 * 1024

# chunk type -> (the field naming its part, the field holding its text)
_DELTAS = {
    "text-delta": ("id", "delta"),
    "reasoning-delta": ("id", "delta"),
    "tool-input-delta": ("toolCallId", "inputTextDelta"),
}


def _delta(chunk: str) -> tuple[str, str, str] | None:
    """(type, part id, text) of a delta that may be merged; None for any other chunk."""
    if '"delta"' not in chunk and '"inputTextDelta"' not in chunk:  # most chunks: no parse
        return None
    try:
        parsed = load_json(chunk)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or len(parsed) != 3:
        return None
    fields = _DELTAS.get(parsed.get("type", ""))
    if fields is None:
        return None
    part, text = parsed.get(fields[0]), parsed.get(fields[1])
    if not isinstance(part, str) or not isinstance(text, str):
        return None
    return parsed["type"], part, text


class Compacted:
    """Chunks with their deltas merged, and for each the offset of the last chunk it covers."""

    __slots__ = ("chunks", "offsets")

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.offsets: list[int] = []

    def batches(self, max_batch: int, max_chars: int) -> list[ChunkBatch]:
        """The chunks in batches of at most `max_batch` chunks and about `max_chars` characters
        (at least one chunk each)."""
        out: list[ChunkBatch] = []
        start = 0
        while start < len(self.chunks):
            end, chars = start, 0
            while end < len(self.chunks) and end - start < max_batch:
                chars += len(self.chunks[end])
                if chars > max_chars and end > start:
                    break
                end += 1
            first = 0 if start == 0 else self.offsets[start - 1] + 1
            out.append(ChunkBatch(first, self.chunks[start:end], self.offsets[start:end]))
            start = end
        return out


def compact(chunks: Sequence[str], end: int) -> Compacted:
    """The stream's chunks [0, end), each run of consecutive deltas of one part merged."""
    out = Compacted()
    run_key: tuple[str, str] | None = None
    run_texts: list[str] = []
    run_chars = 0
    run_first = ""  # the run's chunk as stored, sent as is when the run is one chunk long

    def flush(last: int) -> None:
        if run_key is None:
            return
        if len(run_texts) == 1:
            out.chunks.append(run_first)
        else:
            kind, part = run_key
            part_field, text_field = _DELTAS[kind]
            merged = {"type": kind, part_field: part, text_field: "".join(run_texts)}
            out.chunks.append(dump_json(merged))
        out.offsets.append(last)

    for offset in range(end):
        chunk = chunks[offset]
        delta = _delta(chunk)
        if delta is not None:
            kind, part, text = delta
            if (kind, part) == run_key and run_chars + len(text) <= MERGED_MAX_CHARS:
                run_texts.append(text)
                run_chars += len(text)
                continue
            flush(offset - 1)
            run_key, run_texts, run_chars, run_first = (kind, part), [text], len(text), chunk
            continue
        flush(offset - 1)
        run_key = None
        out.chunks.append(chunk)
        out.offsets.append(offset)
    flush(end - 1)
    return out
