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

A stream keeps one Compaction, extended by the chunks appended since it was last asked for, so a
resume costs the chunks new since the previous one, not the whole stream; and readers take its
batches lazily, so a reader holds no copy of it.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator, Sequence

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


def _joined(kind: str, part: str, texts: list[str]) -> str:
    """One delta of `kind` for `part` holding `texts`, joined."""
    part_field, text_field = _DELTAS[kind]
    return dump_json({"type": kind, part_field: part, text_field: "".join(texts)})


def _merged(chunks: Sequence[str], start: int, end: int) -> str:
    """Chunks [start, end), a run of mergeable deltas of one part, as one delta."""
    if end - start == 1:
        return chunks[start]  # as stored, byte for byte
    texts = []
    kind = part = ""
    for offset in range(start, end):
        delta = _delta(chunks[offset])
        assert delta is not None, "a run holds only mergeable deltas"
        kind, part, text = delta
        texts.append(text)
    return _joined(kind, part, texts)


class Compaction:
    """The compacted form of a stream's chunks [0, upto): entries, each a chunk as stored or a
    merged run, with the offset of the last chunk it covers; and the run still open at `upto`
    (it may grow with the next chunks), kept as the offset it starts at."""

    __slots__ = (
        "_run_chars",
        "_run_key",
        "_run_texts",
        "chunks",
        "merged_chars",
        "offsets",
        "run_start",
        "upto",
    )

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.offsets = array("q")
        self.upto = 0
        self.run_start = 0  # the open run is [run_start, upto) when `_run_key` is set
        self._run_key: tuple[str, str] | None = None
        self._run_texts: list[str] = []  # the open run's texts (at most MERGED_MAX_CHARS)
        self._run_chars = 0
        self.merged_chars = 0  # the merged chunks' text: what it holds beyond the stream's own

    @property
    def held_bytes(self) -> int:
        """About what it holds of its own: merged text, and a pointer and an offset per entry."""
        return self.merged_chars + 16 * len(self.offsets)

    def extend(self, chunks: Sequence[str], end: int) -> None:
        """Takes in the stream's chunks [upto, end)."""
        for offset in range(self.upto, end):
            delta = _delta(chunks[offset])
            if delta is not None:
                kind, part, text = delta
                fits = self._run_chars + len(text) <= MERGED_MAX_CHARS
                if (kind, part) == self._run_key and fits:
                    self._run_texts.append(text)
                    self._run_chars += len(text)
                    continue
                self._close_run(chunks, offset)
                self._run_key, self._run_texts = (kind, part), [text]
                self._run_chars, self.run_start = len(text), offset
                continue
            self._close_run(chunks, offset)
            self.chunks.append(chunks[offset])
            self.offsets.append(offset)
        self.upto = max(self.upto, end)

    def _close_run(self, chunks: Sequence[str], end: int) -> None:
        if self._run_key is not None:
            if len(self._run_texts) == 1:
                merged = chunks[self.run_start]  # as stored, byte for byte
            else:
                merged = _joined(*self._run_key, self._run_texts)
                self.merged_chars += len(merged)
            self.chunks.append(merged)
            self.offsets.append(end - 1)
            self._run_key, self._run_texts = None, []

    def batches(
        self, chunks: Sequence[str], end: int, max_batch: int, max_chars: int
    ) -> Iterator[ChunkBatch]:
        """The compaction of [0, end) (end <= upto), lazily, in batches of at most `max_batch`
        chunks and about `max_chars` characters (at least one chunk each). Entries are only
        ever appended, so what it reads stays valid while the stream grows."""
        end = min(end, len(chunks))  # an end that dropped a fenced writer's chunks
        whole = bisect.bisect_right(self.offsets, end - 1)  # entries wholly before `end`
        tail_start = self.offsets[whole - 1] + 1 if whole else 0
        # [tail_start, end) is the start of one run: of the next entry, or of the open run.
        tail = _merged(chunks, tail_start, end) if tail_start < end else None
        index = 0
        while index < whole or tail is not None:
            batch: list[str] = []
            offsets: list[int] = []
            first = self.offsets[index - 1] + 1 if index else 0
            size = 0
            while len(batch) < max_batch and (index < whole or tail is not None):
                chunk = self.chunks[index] if index < whole else tail
                assert chunk is not None
                size += len(chunk)
                if batch and size > max_chars:
                    break
                batch.append(chunk)
                if index < whole:
                    offsets.append(self.offsets[index])
                    index += 1
                else:
                    offsets.append(end - 1)
                    tail = None
            yield ChunkBatch(first, batch, offsets)


def compact(chunks: Sequence[str], end: int) -> tuple[list[str], list[int]]:
    """The chunks [0, end) compacted, and for each the offset of the last chunk it covers."""
    compaction = Compaction()
    compaction.extend(chunks, end)
    out: list[str] = []
    offsets: list[int] = []
    for batch in compaction.batches(chunks, end, end or 1, 1 << 62):
        out += batch.chunks
        offsets += batch.offsets or []
    return out, offsets
