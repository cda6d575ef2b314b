# ruff: noqa: RUF001
"""stream-relay's benchmark suite: stream-relay, the gRPC ceiling and the peer, in one run.

    python -m bench            # the full run (minutes): >= 3 runs per figure after a warm-up
    python -m bench --quick    # a short run CI may take (< 1 minute): small sizes, 1 run

Prints one table: stream-relay, the ceiling (a bare grpc.aio server-streaming service) and the peer
(Vercel's resumable-stream on Redis, from Node) side by side, with ratios and the targets of the
benchmark issue. Every chunk is checked for gaps and duplicates; any loss fails the run (exit 1).
Figures are medians over the runs with min-max. A full run writes bench/results/<date>-<host>.md.

Processes: every relay is its own subprocess (`python -m relay.server`, `python -m gateway.server
--embedded-relay`, or bench.relay_host, which adds the stamping bench producer); readers are
bench.worker subprocesses; the ceiling server and the peer's producers and readers are
subprocesses too. The echo producer runs inside the relay (it is the relay's built-in producer);
the bench producer too, in bench.relay_host.

Each scenario is its own module, with its setup, its load, its rows and its notes:
bench/s1_one_stream.py ... bench/s6_memory.py, bench/cluster.py (the cluster rows, two relays on
PostgreSQL + Redis) and bench/compact_resume.py (scenario R, the AI SDK client's resume). What
they share is bench/harness.py. This module is the command line, the order of the scenarios, and
the table, notes and results file they make together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bench import (
    cluster,
    compact_resume,
    s1_one_stream,
    s2_fan_out,
    s3_paced,
    s4_resume,
    s5_stop,
    s6_memory,
    s7_browsers,
)
from bench.common import ROOT
from bench.harness import (
    FULL,
    PEER_DIR,
    QUICK,
    Bench,
    Redis,
    Results,
    Row,
    Sizes,
    fmt,
    ratio,
)

RESULTS_DIR = ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str  # for --only
    run: Callable[[Bench], Awaitable[None]]
    rows: Sequence[Row]
    notes: Callable[[Results], list[str]] | None = None  # after the shared notes


# The scenarios in the order they run, their rows in the table and their notes.
SCENARIOS = [
    Scenario("s1", s1_one_stream.run, s1_one_stream.ROWS, s1_one_stream.notes),
    Scenario("s2", s2_fan_out.run, s2_fan_out.ROWS),
    Scenario("s3", s3_paced.run, s3_paced.ROWS, s3_paced.notes),
    Scenario("s4", s4_resume.run, s4_resume.ROWS),
    Scenario("s5", s5_stop.run, s5_stop.ROWS, s5_stop.notes),
    Scenario("s6", s6_memory.run, s6_memory.ROWS, s6_memory.notes),
    # many SSE browsers at 50 chunks/s through the gateway and through the peer's server
    Scenario("b", s7_browsers.run, s7_browsers.ROWS, s7_browsers.notes),
    # relays A and B on PostgreSQL + Redis; its notes are added as it runs
    Scenario("cluster", cluster.run, cluster.ROWS),
    # the AI SDK client resuming a whole answer, plain and compacted; its note is added as it runs
    Scenario("r", compact_resume.run, compact_resume.ROWS),
]


async def run_scenarios(bench: Bench) -> None:
    args = bench.args
    scenarios = {s.name: s for s in SCENARIOS}
    default = [s for s in scenarios if not (s == "cluster" and args.no_cluster)]
    only = args.only.split(",") if args.only else default
    unknown = set(only) - set(scenarios)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; known: {', '.join(scenarios)}")
    if not args.skip_peer:
        async with bench.part("peer setup"):
            await bench.start_peer()
    else:
        bench.results.notes.append("The peer was skipped (--skip-peer).")
    try:
        for name in only:
            await scenarios[name].run(bench)
    finally:
        await bench.stop_peer()


# --- the table --------------------------------------------------------------------------------


def table(results: Results) -> tuple[str, int]:
    header = ["#", "measure", "stream-relay", "ceiling", "peer", "SR ÷ ceiling", "SR ÷ peer"]
    header += ["target", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missed = 0
    for row in [row for scenario in SCENARIOS for row in scenario.rows]:
        relay = results.get(row.metric, "relay")
        ceiling = results.get(row.ceiling, "ceiling") if row.ceiling else None
        peer = results.get(row.metric, "peer")
        verdict = row.verdict(results)
        missed += verdict is False
        unit = f" ({row.unit})" if row.unit in ("ms", "KB", "s") else ""
        cells = [
            row.scenario,
            row.measure + unit,
            fmt(relay, row.unit),
            fmt(ceiling, row.unit),
            fmt(peer, row.unit),
            ratio(relay, ceiling),
            ratio(relay, peer),
            row.target,
            "" if verdict is None else ("met" if verdict else "**MISSED**"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), missed


def notes(results: Results, sizes: Sizes, quick: bool) -> list[str]:
    out = []
    if quick:
        out.append(
            "QUICK run: sizes reduced and 1 run; the targets are for the full run "
            "(`python -m bench`)."
        )
    else:
        out.append(
            f"Medians of {sizes.runs} runs after a warm-up, min–max in brackets; latencies are "
            "from the producer's timestamp in the chunk to the reader's receipt."
        )
    bytes_figure = results.get("s1.grpc.bytes", "relay")
    fan_bytes = results.get("s2.chunk_bytes", "relay")
    out += [
        f"Sizes: 1) {sizes.s1_chunks:,} chunks (peer {sizes.s1_peer_chunks:,}); 2) "
        f"{sizes.s2_streams} streams × {sizes.s2_count:,}; 3) {sizes.s3_streams} streams × "
        f"{sizes.s3_rate:g} chunks/s × {sizes.s3_seconds:g} s; 4) {sizes.s4_count:,} chunks; 5) "
        f"{sizes.s5_readers} readers; 6) {sizes.s6_retained} retained streams, "
        f"{sizes.s6_readers} idle readers, {sizes.s6_frozen:,} chunks under the frozen reader.",
        "stream-relay: every relay is its own process, apart from the readers' processes. "
        "Scenario 1 runs the relay's own entry points with the built-in echo producer, which "
        "lives INSIDE the relay process (`python -m relay.server`; SSE: `python -m gateway.server "
        "--embedded-relay`, gateway and relay in one process); its chunks are text-delta JSON of "
        + (f"{bytes_figure.median:.0f} bytes on average" if bytes_figure else "~46 bytes")
        + ". Scenarios 2–6 use bench/relay_host.py: the same relay (build_relay + start_server, "
        "default flags) plus a bench-only producer, also inside the relay process, that streams "
        "an answer's text like a model: a text-start, then text deltas each carrying its offset "
        "and the time it was made ("
        + (f"{fan_bytes.median:.0f} bytes" if fan_bytes else "~55 bytes")
        + ' of JSON on average). The row "producer in its own process" runs '
        'examples/producer_python.py as a relay producer profile of kind "grpc" (each gRPC '
        "response carries every chunk the producer has ready, up to 500).",
        "Ceiling: a bare grpc.aio server-streaming method sending the relay's own AttachResponse "
        "messages of pre-built 40-byte chunks (bench/ceiling.py), reader in another process.",
        "Peer: resumable-stream on Redis (createNewResumableStream in a Node producer process, "
        "resumeExistingStream in a Node reader process), 40-byte chunks; its CPU row counts "
        "redis-server + the producer process.",
        "Ratios are stream-relay ÷ reference: above 1 is better for chunks/s, below 1 is better "
        "for latencies and CPU.",
    ]
    for scenario in SCENARIOS:
        if scenario.notes is not None:
            out += scenario.notes(results)
    return out + results.notes


# --- the machine ------------------------------------------------------------------------------


def machine(redis: Redis | None) -> dict[str, str]:
    import google.protobuf
    import grpc

    def run(*argv: str) -> str:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=10, cwd=ROOT
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"

    def package_version(name: str) -> str:
        try:
            return str(
                json.loads((PEER_DIR / "node_modules" / name / "package.json").read_text())[
                    "version"
                ]
            )
        except (OSError, ValueError, KeyError):
            return "not installed"

    commit = run("git", "rev-parse", "--short", "HEAD")
    dirty = run("git", "status", "--porcelain", "--", "relay", "gateway")
    return {
        "host": platform.node(),
        "cpus": f"{os.cpu_count()} × {model}",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "load average (1, 5, 15 min) at the end": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "node": run("node", "--version") if shutil.which("node") else "not found",
        "resumable-stream": package_version("resumable-stream"),
        "redis (npm)": package_version("redis"),
        "redis-server": (
            redis.info.get("redis_version", "?")
            + (" (the bench's own)" if redis.process else " (127.0.0.1:6379)")
        )
        if redis
        else "not used",
        "stream-relay": commit + (" + uncommitted changes in relay/ or gateway/" if dirty else ""),
    }


def write_results(
    path: Path,
    text_table: str,
    note_lines: list[str],
    info: dict[str, str],
    results: Results,
    argv: list[str],
    started: datetime.datetime,
    seconds: float,
    note: str,
) -> None:
    shown = list(argv)
    if "--note" in shown:  # the note is shown on its own line
        del shown[shown.index("--note") : shown.index("--note") + 2]
    shown = [a for a in shown if not a.startswith("--note=")]
    command = " ".join(["python -m bench", *shown])
    lines = [
        f"# stream-relay benchmark, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} minutes)",
        "",
    ]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["| machine and versions | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", text_table, ""]
    lines += [f"- {n}" for n in note_lines]
    if results.failures:
        lines += ["", "## Failures", ""] + [f"```\n{f}\n```" for f in results.failures]
    lines += ["", "## Every run", "", "Run -1 is the warm-up.", "", "```"]
    for label, events in results.runs.items():
        for event in events:
            fields = {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in event.items()
                if k != "event"
            }
            lines.append(f"{label}: {json.dumps(fields)}")
    lines += ["```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run (< 1 minute)")
    parser.add_argument("--runs", type=int, help="measured runs per figure (default 3; quick 1)")
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios: s1,s2,s3,s4,s5,s6,cluster,r"
    )
    parser.add_argument(
        "--no-cluster",
        action="store_true",
        help="leave out the cluster rows (bench/cluster.py: two relays on PostgreSQL + Redis)",
    )
    parser.add_argument(
        "--skip-peer", action="store_true", help="run without the peer (no Node/Redis)"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="write the results file here (default: bench/results/<date>-<host>.md for a full "
        "run of every scenario, none for --quick or --only); 'none' writes none",
    )
    parser.add_argument(
        "--relay-args",
        default="",
        help="extra relay.server flags for the relays of scenarios 1 (gRPC) to 6, e.g. "
        "--relay-args='--journal-interval-ms 200'",
    )
    parser.add_argument(
        "--resume-settle-s",
        type=float,
        default=0.0,
        help="scenario 4: wait this long between the 10,000th chunk and the resume (default 0: "
        "the resume races the relay's journal write of those chunks)",
    )
    parser.add_argument(
        "--note", default="", help="a line for the results file (e.g. 'shared machine')"
    )
    parser.add_argument(
        "--profile", default="", help="record py-spy profiles of the relay (s1-s5) into DIR"
    )
    parser.add_argument(
        "--profile-args",
        default="",
        help="more py-spy record flags, e.g. --profile-args='--native --gil'",
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.runs:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    started = datetime.datetime.now(datetime.UTC)
    began = time.monotonic()
    load_at_start = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="stream-relay-bench-") as tmp:
        bench = Bench(args, sizes, Path(tmp))
        try:
            await run_scenarios(bench)
        finally:
            info = {"load average (1, 5, 15 min) at the start": load_at_start}
            info |= machine(bench.redis)
        text, missed = table(bench.results)
        note_lines = notes(bench.results, sizes, args.quick)
        print()
        print(text)
        print()
        for line in note_lines:
            print(f"- {line}")
        if bench.results.failures:
            print("\nFAILED:")
            for failure in bench.results.failures:
                print(f"- {failure}")
            print(f"(logs of every process: kept in {tmp}-logs)")
            shutil.copytree(bench.logs, f"{tmp}-logs", dirs_exist_ok=True)
        seconds = time.monotonic() - began
        target = args.results
        if target is None and not args.quick and not args.only:
            target = str(RESULTS_DIR / f"{started:%Y-%m-%d}-{info['host']}.md")
        if target and target != "none":
            write_results(
                Path(target),
                text,
                note_lines,
                info,
                bench.results,
                sys.argv[1:],
                started,
                seconds,
                args.note,
            )
            print(f"\nresults written to {target}")
        verdict = "FAILED" if bench.results.failures else "ok"
        print(
            f"\n{verdict}: {len(bench.results.failures)} failures, {missed} targets missed, "
            f"{seconds:.0f} s"
        )
    return 1 if bench.results.failures else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(amain(parse_args(argv))))


if __name__ == "__main__":
    main()
