"""The soak's checker: a history of what every client saw, compared with the relay's journal.

Pure: no I/O, no clock. The runner (`soak.run`) records a `History` while it drives the relay and,
once the relay has stopped, reads the journal from its database; `check` then says, Jepsen-style,
whether what the clients were told is consistent with itself and with what the relay kept:

- every reader saw a gap-free, duplicate-free run of chunks from the offset it asked for, then at
  most one end, with nothing after it; a reader whose call finished normally saw exactly one end,
  and the end's final offset is where the reader stands;
- all readers of a stream agree on the chunk at each offset;
- a stream that ended on its own or by a Stop kept everything any reader saw: its journal holds
  exactly those chunks, its persisted end is the end every reader and every Stop receipt got, and
  the chat's persisted messages hold the end's message;
- a stream cut by a SIGKILL comes back INTERRUPTED, its journal a prefix of what readers saw, and
  the chunks lost are only those of the journal window before the kill;
- a reader resuming from an offset some reader had seen is never refused (OUT_OF_RANGE, NOT_FOUND);
- Start with a request id is idempotent; a superseded stream was stopped; once everything has
  ended, no chat's active pointer is left on a stream.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]

INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class End:
    """A stream's end as a client saw it (or as the journal holds it)."""

    state: str  # "completed", "stopped", "failed", "interrupted"
    final_offset: int
    error_message: str = ""
    message: JsonObject | None = None  # the persisted assistant message, as UIMessage JSON

    def describe(self) -> str:
        text = f"{self.state} at {self.final_offset}"
        return f"{text} ({self.error_message})" if self.error_message else text


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk a reader received: its offset, its bytes and when it arrived (monotonic s)."""

    offset: int
    data: str
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class EndEvent:
    end: End
    at: float = 0.0


# What a reader's call ended with.
OPEN = "open"  # still running (only in a history that was not finished)
ENDED = "end"  # the call finished normally (it must have delivered exactly one end)
DISCONNECTED = "disconnected"  # the soak left on purpose, mid-stream
CUT = "cut"  # the call failed because the relay was killed
REFUSED = "refused"  # the relay refused the Attach (code says why)
ERROR = "error"  # the call failed and no kill explains it
STALLED = "stalled"  # the call's deadline passed


@dataclass(slots=True)
class ReaderLog:
    """One Attach (or one AttachMany subscription): what it asked for and what it received."""

    reader: str  # "r12.3": reader chain 12, its third session
    stream_id: str
    from_offset: int
    life: int = 0  # the relay life (0, 1, ...: kill i ends life i) that served the call
    via: str = "attach"  # attach | attach-chat | attach-many | final
    events: list[Chunk | EndEvent] = field(default_factory=list)
    outcome: str = OPEN
    code: str = ""  # the gRPC status name, for refused, error, cut and stalled
    detail: str = ""

    def add_batch(self, first_offset: int, chunks: list[str], at: float) -> None:
        self.events.extend(Chunk(first_offset + i, c, at) for i, c in enumerate(chunks))

    def add_end(self, end: End, at: float) -> None:
        self.events.append(EndEvent(end, at))

    @property
    def chunk_count(self) -> int:
        return sum(1 for e in self.events if isinstance(e, Chunk))

    @property
    def ends(self) -> list[End]:
        return [e.end for e in self.events if isinstance(e, EndEvent)]

    def next_offset(self) -> int:
        """Where this reader stands: the offset after the last chunk it received."""
        chunks = [e.offset for e in self.events if isinstance(e, Chunk)]
        return chunks[-1] + 1 if chunks else self.from_offset


@dataclass(slots=True)
class StreamRecord:
    """A stream some call told the soak about."""

    stream_id: str
    chat_id: str
    life: int  # the relay life in which the Start call that created it began
    delay_ms: float  # the echo producer's pause before each chunk: its rate is at most 1/delay
    chunks: int | None = None  # text deltas asked for
    request_id: str = ""
    discovered: bool = False  # learnt from an Attach by chat or a Stop, not from its Start


@dataclass(frozen=True, slots=True)
class StartRecord:
    chat_id: str
    request_id: str
    stream_id: str
    deduplicated: bool
    superseded_stream_id: str = ""


@dataclass(frozen=True, slots=True)
class StopRecord:
    chat_id: str
    named_stream_id: str  # the stream the Stop named ("" for the chat's active one)
    outcome: str  # "stopped", "already_ended", "no_active_stream", "not_active"
    stream_id: str
    end: End | None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A stream as the relay's store holds it once the relay has stopped."""

    chat_id: str
    chunks: list[str]
    end: End | None  # None: still recorded as live


@dataclass(slots=True)
class History:
    streams: dict[str, StreamRecord] = field(default_factory=dict)
    readers: list[ReaderLog] = field(default_factory=list)
    starts: list[StartRecord] = field(default_factory=list)
    stops: list[StopRecord] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)  # kill i, ending life i: when (monotonic s)
    unexpected: list[str] = field(default_factory=list)  # RPC failures no kill explains
    # Filled once the soak has settled (everything stopped) and the relay has exited:
    journal: dict[str, JournalEntry] = field(default_factory=dict)
    persisted: dict[str, list[JsonObject]] = field(default_factory=dict)  # ListMessages per chat
    final_active: dict[str, str | None] = field(default_factory=dict)  # GetActive per chat


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    subject: str  # the stream, reader or chat it concerns
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.subject}: {self.detail}"


@dataclass(slots=True)
class Report:
    violations: list[Violation] = field(default_factory=list)
    streams: int = 0
    readers: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    chunk_deliveries: int = 0  # chunks received by readers, each checked for order and agreement
    chunks_vs_journal: int = 0  # distinct (stream, offset) compared with the journal's bytes
    ends_checked: int = 0
    end_states: Counter[str] = field(default_factory=Counter)
    interrupted: int = 0
    lost_chunks: int = 0  # seen by readers, not journaled, within the window
    max_lost: int = 0
    max_loss_age_s: float = 0.0  # kill time minus the arrival of the first lost chunk

    def add(self, kind: str, subject: str, detail: str) -> None:
        self.violations.append(Violation(kind, subject, detail))


@dataclass(slots=True)
class _Agreed:
    """What readers agree a stream holds: offset -> (bytes, first arrival, who saw it first)."""

    chunks: dict[int, tuple[str, float, str]] = field(default_factory=dict)
    disagreements: int = 0

    @property
    def length(self) -> int:
        return max(self.chunks) + 1 if self.chunks else 0


def check(history: History, window_s: float, slack_s: float = 0.5) -> Report:
    """Checks a finished history. `window_s` is the relay's journal interval: a SIGKILL may lose
    the chunks of a live stream produced in the last window before it; `slack_s` allows for the
    journal's write itself and the event loop's lag."""
    report = Report()
    agreed: dict[str, _Agreed] = {}
    for log in history.readers:
        _check_reader(log, report)
        _agree(log, agreed.setdefault(log.stream_id, _Agreed()), report)
    report.readers = len(history.readers)
    report.chunk_deliveries = sum(log.chunk_count for log in history.readers)

    stream_ids = set(history.streams) | {log.stream_id for log in history.readers}
    report.streams = len(stream_ids)
    for stream_id in sorted(stream_ids):
        _check_stream(
            history, stream_id, agreed.get(stream_id, _Agreed()), window_s, slack_s, report
        )
    _check_refusals(history, agreed, report)
    _check_starts(history, report)
    _check_stops(history, report)
    _check_messages(history, report)
    for chat_id, active in sorted(history.final_active.items()):
        if active is not None:
            entry = history.journal.get(active)
            state = entry.end.describe() if entry and entry.end else "live"
            report.add(
                "active-left",
                chat_id,
                f"once everything had ended, GetActive still names stream {active} ({state})",
            )
    for failure in history.unexpected:
        report.add("unexpected-error", "rpc", failure)
    return report


def _check_reader(log: ReaderLog, report: Report) -> None:
    """A reader's own log: from its offset, no gap, no duplicate, one end at most, nothing after
    it, and the end's final offset is where the reader stands."""
    report.outcomes[log.outcome] += 1
    subject = f"reader {log.reader} of {log.stream_id}"
    expected = log.from_offset
    received = 0
    ended: End | None = None
    after_end = 0
    for event in log.events:
        if ended is not None:
            after_end += 1
            continue
        if isinstance(event, Chunk):
            received += 1
            if event.offset > expected:
                report.add("gap", subject, f"expected offset {expected}, got {event.offset}")
            elif event.offset < expected:
                report.add("duplicate", subject, f"expected offset {expected}, got {event.offset}")
            expected = max(expected, event.offset + 1)
            continue
        ended = event.end
        final = ended.final_offset
        past_journal = ended.state == INTERRUPTED and received == 0 and final < log.from_offset
        if final != expected and not past_journal:
            report.add(
                "end-offset",
                subject,
                f"the end says {ended.describe()} but the reader stands at offset {expected}",
            )
    ends = len(log.ends)
    if ends > 1:
        report.add("double-end", subject, f"{ends} ends")
    elif after_end:
        report.add("after-end", subject, f"{after_end} events after the end")
    if log.outcome == ENDED and ends == 0:
        report.add("missing-end", subject, "the call finished without a StreamEnd")
    if log.outcome == ERROR:
        report.add("reader-error", subject, f"{log.code}: {log.detail}")
    if log.outcome == STALLED:
        report.add("stalled", subject, f"no end before the deadline ({log.code}: {log.detail})")
    if log.outcome == OPEN:
        report.add("unfinished", subject, "the reader never finished")


def _agree(log: ReaderLog, agreed: _Agreed, report: Report) -> None:
    for event in log.events:
        if not isinstance(event, Chunk):
            continue
        first = agreed.chunks.get(event.offset)
        if first is None:
            agreed.chunks[event.offset] = (event.data, event.at, log.reader)
        else:
            if first[0] != event.data:
                agreed.disagreements += 1
                if agreed.disagreements <= 3:
                    report.add(
                        "disagree",
                        f"stream {log.stream_id}",
                        f"offset {event.offset}: reader {first[2]} got {_short(first[0])}, "
                        f"reader {log.reader} got {_short(event.data)}",
                    )
            if event.at < first[1]:
                agreed.chunks[event.offset] = (first[0], event.at, first[2])


def _check_stream(
    history: History,
    stream_id: str,
    agreed: _Agreed,
    window_s: float,
    slack_s: float,
    report: Report,
) -> None:
    subject = f"stream {stream_id}"
    entry = history.journal.get(stream_id)
    if entry is None:
        report.add("not-journaled", subject, "the store does not know this acknowledged stream")
        return
    end = entry.end
    if end is None:
        report.add("still-live", subject, "the store still records the stream as live")
        return
    report.end_states[end.state] += 1
    if end.final_offset != len(entry.chunks):
        report.add(
            "journal-end",
            subject,
            f"the end says {end.describe()} but the journal holds {len(entry.chunks)} chunks",
        )
    mismatches = 0
    for offset in range(min(len(entry.chunks), agreed.length)):
        seen = agreed.chunks.get(offset)
        if seen is None:
            continue
        report.chunks_vs_journal += 1
        if seen[0] != entry.chunks[offset]:
            mismatches += 1
            if mismatches == 1:
                report.add(
                    "journal-mismatch",
                    subject,
                    f"offset {offset}: readers got {_short(seen[0])}, "
                    f"the journal holds {_short(entry.chunks[offset])}",
                )
    if mismatches > 1:
        report.add("journal-mismatch", subject, f"{mismatches} offsets differ in all")

    for log in history.readers:
        if log.stream_id != stream_id:
            continue
        for seen_end in log.ends:
            report.ends_checked += 1
            if seen_end != end:
                report.add(
                    "end-mismatch",
                    f"reader {log.reader} of {stream_id}",
                    f"got {_describe_end(seen_end)}; the store holds {_describe_end(end)}",
                )

    lost = agreed.length - len(entry.chunks)
    if end.state != INTERRUPTED:
        if lost > 0:
            report.add(
                "lost-acknowledged",
                subject,
                f"readers saw {agreed.length} chunks; the stream ended {end.describe()} and its "
                f"journal holds {len(entry.chunks)}",
            )
        return

    report.interrupted += 1
    record = history.streams.get(stream_id)
    lives = [log.life for log in history.readers if log.stream_id == stream_id]
    born = record.life if record is not None else min(lives, default=0)
    if len(history.kills) <= born:
        report.add("interrupted-without-kill", subject, "interrupted, but no kill came after it")
    if lost <= 0:
        return
    # The kill that lost them ended the life in which readers got them.
    journaled = len(entry.chunks)
    life = max(
        (
            log.life
            for log in history.readers
            if log.stream_id == stream_id
            and any(isinstance(e, Chunk) and e.offset >= journaled for e in log.events)
        ),
        default=born,
    )
    _check_loss(history, stream_id, agreed, len(entry.chunks), life, window_s, slack_s, report)


def _check_loss(
    history: History,
    stream_id: str,
    agreed: _Agreed,
    journaled: int,
    life: int,
    window_s: float,
    slack_s: float,
    report: Report,
) -> None:
    """The chunks readers saw beyond the journal of an interrupted stream: only those of the
    journal window before the kill may be missing."""
    subject = f"stream {stream_id}"
    lost = agreed.length - journaled
    first_lost = agreed.chunks[min(o for o in agreed.chunks if o >= journaled)]
    kill = history.kills[life] if life < len(history.kills) else None
    if kill is None:
        report.add(
            "lost-acknowledged",
            subject,
            f"readers saw {agreed.length} chunks, the journal holds {journaled}, and no kill "
            f"ended relay life {life}, where readers got them",
        )
        return
    report.lost_chunks += lost
    report.max_lost = max(report.max_lost, lost)
    age = kill - first_lost[1]
    report.max_loss_age_s = max(report.max_loss_age_s, age)
    record = history.streams.get(stream_id)
    delay_ms = record.delay_ms if record is not None else 1.0
    bound = math.ceil((window_s + slack_s) * 1000.0 / max(delay_ms, 0.001)) + 1
    if lost > bound or age > window_s + slack_s:
        report.add(
            "loss-over-window",
            subject,
            f"{lost} chunks seen by readers were not journaled (at most {bound} at one chunk per "
            f"{delay_ms:g} ms in {window_s:g} s + {slack_s:g} s slack); the first of them "
            f"arrived {age:.3f} s before the kill",
        )


def _check_refusals(history: History, agreed: dict[str, _Agreed], report: Report) -> None:
    """A reader asking for an offset some reader had seen must get chunks or the end, never a
    refusal: after a crash the stream's interrupted end, not OUT_OF_RANGE."""
    for log in history.readers:
        if log.outcome != REFUSED:
            continue
        subject = f"reader {log.reader} of {log.stream_id}"
        seen = agreed.get(log.stream_id, _Agreed()).length
        entry = history.journal.get(log.stream_id)
        journaled = f"; the journal holds {len(entry.chunks)} chunks" if entry else ""
        if log.code == "OUT_OF_RANGE" and log.from_offset <= seen:
            report.add(
                "resume-refused",
                subject,
                f"resume from offset {log.from_offset} (readers had seen {seen} chunks) refused "
                f"OUT_OF_RANGE{journaled}: a resuming reader must get the stream's end",
            )
        else:
            report.add(
                "attach-refused",
                subject,
                f"attach from {log.from_offset} refused {log.code}: {log.detail}",
            )


def _check_starts(history: History, report: Report) -> None:
    by_key: dict[tuple[str, str], set[str]] = {}
    for start in history.starts:
        if start.request_id:
            by_key.setdefault((start.chat_id, start.request_id), set()).add(start.stream_id)
        if start.superseded_stream_id:
            entry = history.journal.get(start.superseded_stream_id)
            state = entry.end.state if entry is not None and entry.end is not None else "live"
            # A stream that was already completing when the Start claimed it may complete.
            if state not in ("stopped", "completed"):
                report.add(
                    "supersede",
                    f"stream {start.superseded_stream_id}",
                    f"superseded by {start.stream_id} but ended {state}",
                )
    for (chat_id, request_id), streams in sorted(by_key.items()):
        if len(streams) > 1:
            report.add(
                "dedup",
                chat_id,
                f"Start with request_id {request_id!r} returned {len(streams)} streams: "
                + ", ".join(sorted(streams)),
            )


def _check_stops(history: History, report: Report) -> None:
    for stop in history.stops:
        if stop.outcome == "stopped" and (stop.end is None or stop.end.state != "stopped"):
            report.add(
                "stop-mismatch",
                f"stream {stop.stream_id}",
                f"Stop said stopped, with end {_describe_end(stop.end)}",
            )
        if stop.end is None:
            continue
        entry = history.journal.get(stop.stream_id)
        if entry is not None and entry.end is not None and entry.end != stop.end:
            report.add(
                "stop-mismatch",
                f"stream {stop.stream_id}",
                f"Stop ({stop.outcome}) answered {_describe_end(stop.end)}; the store holds "
                f"{_describe_end(entry.end)}",
            )


def _check_messages(history: History, report: Report) -> None:
    """The persisted end message of every ended stream is among its chat's messages."""
    for stream_id, entry in sorted(history.journal.items()):
        if entry.end is None or entry.end.message is None:
            continue
        persisted = history.persisted.get(entry.chat_id)
        if persisted is None:
            continue  # the chat's messages were not read
        wanted = entry.end.message
        found = next((m for m in persisted if m.get("id") == wanted.get("id")), None)
        if found is None:
            report.add(
                "message-missing",
                f"stream {stream_id}",
                f"ListMessages of {entry.chat_id} lacks the end's message {wanted.get('id')!r}",
            )
        elif found != wanted:
            report.add(
                "message-mismatch",
                f"stream {stream_id}",
                f"ListMessages holds {_short(str(found))}; the end's message is "
                f"{_short(str(wanted))}",
            )


def _describe_end(end: End | None) -> str:
    if end is None:
        return "none"
    text = end.describe()
    if end.message is not None:
        text += f", message {_short(str(end.message))}"
    return text


def _short(text: str, most: int = 80) -> str:
    return repr(text) if len(text) <= most else repr(text[: most - 3] + "...")
