"""The soak's checker on hand-made histories: a clean one passes, and each fault it exists to find
(a gap, a duplicate, a double end, a disagreement, a lost chunk, a refused resume...) is found."""

from __future__ import annotations

from soak.checker import (
    CUT,
    DISCONNECTED,
    ENDED,
    REFUSED,
    Chunk,
    End,
    EndEvent,
    History,
    JournalEntry,
    ReaderLog,
    Report,
    StartRecord,
    StopRecord,
    StreamRecord,
    check,
)

S = "a" * 32
CHAT = "chat-1"
CHUNKS = [f'{{"type":"text-delta","id":"t0","delta":"w{i}"}}' for i in range(6)]
MESSAGE = {"id": f"msg_{S}", "role": "assistant", "parts": [{"type": "text", "text": "w0 w1"}]}
COMPLETED = End("completed", 6, "", MESSAGE)


def chunks(first: int, last: int, at: float = 0.0) -> list[Chunk | EndEvent]:
    return [Chunk(i, CHUNKS[i], at) for i in range(first, last)]


def reader(
    name: str,
    events: list[Chunk | EndEvent],
    *,
    start: int = 0,
    outcome: str = ENDED,
    life: int = 0,
) -> ReaderLog:
    return ReaderLog(name, S, start, life, "attach", events, outcome)


def history(*readers: ReaderLog, end: End = COMPLETED, journaled: int = 6) -> History:
    """One stream of six chunks that completed; the journal, messages and active pointer agree."""
    message = end.message
    return History(
        streams={S: StreamRecord(S, CHAT, 0, 10.0, 6)},
        readers=list(readers),
        journal={S: JournalEntry(CHAT, CHUNKS[:journaled], end)},
        persisted={CHAT: [] if message is None else [message]},
        final_active={CHAT: None},
    )


def kinds(report: Report) -> list[str]:
    return [v.kind for v in report.violations]


def test_a_clean_history_passes() -> None:
    report = check(
        history(
            reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]),
            reader("r2", chunks(0, 3), outcome=DISCONNECTED),
            reader("r3", [*chunks(3, 6), EndEvent(COMPLETED)], start=3),
            reader("r4", [EndEvent(COMPLETED)], start=6),
        ),
        window_s=0.25,
    )
    assert report.violations == []
    assert report.chunk_deliveries == 6 + 3 + 3
    assert report.chunks_vs_journal == 6
    assert report.ends_checked == 3


def test_a_gap_is_found() -> None:
    report = check(
        history(reader("r1", [*chunks(0, 2), *chunks(3, 6), EndEvent(COMPLETED)])), window_s=0.25
    )
    assert kinds(report) == ["gap"]
    assert "expected offset 2, got 3" in str(report.violations[0])


def test_a_first_chunk_past_the_requested_offset_is_a_gap() -> None:
    report = check(history(reader("r1", [*chunks(2, 6), EndEvent(COMPLETED)], start=1)), 0.25)
    assert kinds(report) == ["gap"]


def test_a_duplicate_is_found() -> None:
    report = check(
        history(reader("r1", [*chunks(0, 4), *chunks(3, 6), EndEvent(COMPLETED)])), window_s=0.25
    )
    assert kinds(report) == ["duplicate"]
    assert "expected offset 4, got 3" in str(report.violations[0])


def test_a_double_end_is_found() -> None:
    report = check(
        history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED), EndEvent(COMPLETED)])), 0.25
    )
    assert kinds(report) == ["double-end"]


def test_chunks_after_the_end_are_found() -> None:
    report = check(history(reader("r1", [*chunks(0, 5), EndEvent(COMPLETED), *chunks(5, 6)])), 0.25)
    assert "after-end" in kinds(report)


def test_a_call_that_finished_without_an_end_is_found() -> None:
    report = check(history(reader("r1", chunks(0, 6))), window_s=0.25)
    assert kinds(report) == ["missing-end"]


def test_an_end_at_the_wrong_offset_is_found() -> None:
    early = End("completed", 5, "", MESSAGE)
    report = check(history(reader("r1", [*chunks(0, 6), EndEvent(early)])), window_s=0.25)
    assert "end-offset" in kinds(report)
    assert "end-mismatch" in kinds(report)  # and it is not the end the store holds


def test_readers_that_disagree_on_a_chunk_are_found() -> None:
    other = [
        Chunk(i, CHUNKS[i] if i != 2 else '{"type":"text-delta","delta":"X"}') for i in range(6)
    ]
    report = check(
        history(
            reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]),
            reader("r2", [*other, EndEvent(COMPLETED)]),
        ),
        window_s=0.25,
    )
    assert "disagree" in kinds(report)
    assert "offset 2" in str(report.violations[0])


def test_a_journal_that_differs_from_what_readers_saw_is_found() -> None:
    past = history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]))
    past.journal[S] = JournalEntry(CHAT, [*CHUNKS[:4], "{}", CHUNKS[5]], COMPLETED)
    assert kinds(check(past, window_s=0.25)) == ["journal-mismatch"]


def test_an_acknowledged_chunk_missing_from_a_completed_stream_is_found() -> None:
    short = End("completed", 4, "", MESSAGE)
    report = check(
        history(reader("r1", chunks(0, 6), outcome=DISCONNECTED), end=short, journaled=4), 0.25
    )
    assert kinds(report) == ["lost-acknowledged"]


def interrupted(journaled: int) -> End:
    message = {"id": f"msg_{S}", "role": "assistant", "parts": [{"type": "text", "text": "w0"}]}
    return End("interrupted", journaled, "the relay stopped while the stream was live", message)


def test_a_kill_may_lose_the_last_window_but_no_more() -> None:
    end = interrupted(4)
    within = history(
        reader("r1", [*chunks(0, 4, at=10.0), *chunks(4, 6, at=10.9)], outcome=CUT),
        reader("r2", [*chunks(0, 4), EndEvent(end)], life=1),  # after the restart
        reader("r3", [EndEvent(end)], start=6, life=1),  # resumed past the journal: its end
        end=end,
        journaled=4,
    )
    within.kills = [11.0]
    report = check(within, window_s=0.25)
    assert report.violations == []
    assert (report.interrupted, report.lost_chunks, report.max_lost) == (1, 2, 2)
    assert abs(report.max_loss_age_s - 0.1) < 1e-9

    within.kills = [12.0]  # the first lost chunk arrived 1.1 s before the kill
    assert kinds(check(within, window_s=0.25)) == ["loss-over-window"]


def test_an_interrupted_stream_needs_a_kill() -> None:
    end = interrupted(6)
    report = check(history(reader("r1", [*chunks(0, 6), EndEvent(end)]), end=end), 0.25)
    assert kinds(report) == ["interrupted-without-kill"]


def test_a_resume_refused_out_of_range_after_a_kill_is_found() -> None:
    end = interrupted(4)
    refused = reader("r1.2", [], start=6, outcome=REFUSED, life=1)
    refused.code = "OUT_OF_RANGE"
    crashed = history(
        reader("r1.1", [*chunks(0, 4, at=10.0), *chunks(4, 6, at=10.9)], outcome=CUT),
        refused,
        end=end,
        journaled=4,
    )
    crashed.kills = [11.0]
    report = check(crashed, window_s=0.25)
    assert kinds(report) == ["resume-refused"]
    assert "resume from offset 6" in str(report.violations[0])


def test_a_stop_receipt_that_is_not_the_stored_end_is_found() -> None:
    stopped = End("stopped", 6, "", MESSAGE)
    past = history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]))
    past.stops = [StopRecord(CHAT, S, "stopped", S, stopped)]
    assert kinds(check(past, window_s=0.25)) == ["stop-mismatch"]


def test_an_active_pointer_left_on_an_ended_stream_is_found() -> None:
    past = history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]))
    past.final_active[CHAT] = S
    assert kinds(check(past, window_s=0.25)) == ["active-left"]


def test_a_missing_or_different_persisted_message_is_found() -> None:
    past = history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]))
    past.persisted[CHAT] = []
    assert kinds(check(past, window_s=0.25)) == ["message-missing"]
    past.persisted[CHAT] = [{**MESSAGE, "parts": []}]
    assert kinds(check(past, window_s=0.25)) == ["message-mismatch"]


def test_a_request_id_that_made_two_streams_is_found() -> None:
    past = history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]))
    past.starts = [
        StartRecord(CHAT, "req-1", S, False),
        StartRecord(CHAT, "req-1", "b" * 32, False),
    ]
    assert kinds(check(past, window_s=0.25)) == ["dedup"]


def test_a_stream_the_store_does_not_know_is_found() -> None:
    past = history(reader("r1", [*chunks(0, 6), EndEvent(COMPLETED)]))
    past.journal = {}
    assert "not-journaled" in kinds(check(past, window_s=0.25))
