"""What every part of the bench shares: chunk formats, statistics, /proc readings, the JSON-line
protocol between the orchestrator and its subprocesses.

Clocks: every timestamp a producer puts in a chunk, and every receipt a reader notes, is
CLOCK_MONOTONIC (Python `time.monotonic_ns()`, Node `process.hrtime.bigint()`), which is one clock
for all processes of a Linux machine, in microseconds since the bench's epoch (BENCH_EPOCH_NS, set
by the orchestrator), so a latency is a plain subtraction across processes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EPOCH_ENV = "BENCH_EPOCH_NS"

# --- chunk formats --------------------------------------------------------------------------

# The bench producer's stream, an answer's text: offset 0 is {"type":"text-start","id":"t0"}, then
# text deltas whose delta is "<seq>:<us>", seq being the chunk's offset and us the microseconds
# since the epoch when the producer made it (~55 bytes of compact JSON).
BENCH_START = '{"type":"text-start","id":"t0"}'
BENCH_PREFIX = '{"type":"text-delta","id":"t0","delta":"'
BENCH_PREFIX_LEN = len(BENCH_PREFIX)

# The references' chunk: exactly 40 bytes, "<seq:12>:<us:14>:" then dots. The ceiling leaves the
# stamp 0 (it stamps nothing, to stay a bare ceiling); the peer stamps it.
RECORD_BYTES = 40


def record(seq: int, stamp_us: int = 0) -> str:
    return f"{seq:012d}:{stamp_us:014d}:............"


def record_seq(chunk: str) -> int:
    return int(chunk[:12])


def bench_chunk(seq: int, stamp_us: int) -> dict[str, Any]:
    return {"type": "text-delta", "id": "t0", "delta": f"{seq}:{stamp_us}"}


def parse_bench_chunk(chunk: str) -> tuple[int, int]:
    """(seq, stamp_us) of a bench producer delta, without a JSON parser (readers parse ~1M)."""
    if not chunk.startswith(BENCH_PREFIX):
        raise GapError(f"not a bench text delta: {chunk[:60]!r}")
    seq, stamp = chunk[BENCH_PREFIX_LEN:-2].split(":")
    return int(seq), int(stamp)


# The echo producer's answer to ECHO_QUESTION: "You said: w0 w1 ... w99", one word per text
# delta, the words repeating. 102 distinct words, so a lost or repeated chunk changes the word
# found at an offset; the framing chunks are checked by type.
ECHO_QUESTION = " ".join(f"w{i}" for i in range(100))
ECHO_WORDS = ["You", "said:", *ECHO_QUESTION.split()]
ECHO_HEAD = 3  # start, start-step, text-start
ECHO_TAIL_TYPES = ("text-end", "finish-step", "finish")
ECHO_HEAD_TYPES = ("start", "start-step", "text-start")


def echo_delta(index: int, count: int, words: Sequence[str] = ECHO_WORDS) -> str:
    word = words[index % len(words)] + (" " if index < count - 1 else "")
    return json.dumps(
        {"type": "text-delta", "id": "t0", "delta": word}, separators=(",", ":"), ensure_ascii=False
    )


class EchoChecker:
    """Checks the echo stream of `count` deltas chunk by chunk: every offset, every word.

    `prefix` is the answer's words before the question's ("You said:" for the echo producer;
    "Python producer says:" for examples/producer_python.py)."""

    def __init__(self, count: int, prefix: Sequence[str] = ECHO_WORDS[:2]) -> None:
        self.count = count
        self.total = count + ECHO_HEAD + len(ECHO_TAIL_TYPES)
        self.words = [*prefix, *ECHO_QUESTION.split()]
        self._deltas = [echo_delta(i, count, self.words) for i in range(len(self.words))]
        self._last = echo_delta(count - 1, count, self.words)
        self.bytes = 0

    def check(self, offset: int, chunk: str) -> None:
        self.bytes += len(chunk)
        delta = offset - ECHO_HEAD
        if 0 <= delta < self.count:
            expected = (
                self._last if delta == self.count - 1 else self._deltas[delta % len(self.words)]
            )
            if chunk != expected:
                raise GapError(f"offset {offset}: expected {expected}, got {chunk}")
            return
        if delta < 0:
            kind = ECHO_HEAD_TYPES[offset]
        elif delta - self.count < len(ECHO_TAIL_TYPES):
            kind = ECHO_TAIL_TYPES[delta - self.count]
        else:
            raise GapError(f"offset {offset} is past the end of a {self.total}-chunk echo stream")
        if not chunk.startswith(f'{{"type":"{kind}"'):
            raise GapError(f"offset {offset}: expected a {kind} chunk, got {chunk[:60]}")


class GapError(Exception):
    """A lost, duplicated or out-of-order chunk: fails the run."""


# --- time -----------------------------------------------------------------------------------


def epoch_ns() -> int:
    raw = os.environ.get(EPOCH_ENV)
    return int(raw) if raw else 0


def now_us(epoch: int) -> int:
    return (time.monotonic_ns() - epoch) // 1000


# --- statistics -----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) on sorted values."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_summary(latencies_us: list[int]) -> dict[str, float]:
    values = sorted(latencies_us)
    return {
        "p50_ms": percentile(values, 50) / 1000,
        "p99_ms": percentile(values, 99) / 1000,
        "max_ms": (values[-1] / 1000) if values else math.nan,
        "samples": len(values),
    }


# --- /proc ----------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- the JSON-line protocol of subprocesses -------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    """One event on stdout, for the orchestrator."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()
