"""python -m soak [--seconds N] [--streams N] [--seed S]: exits 1 if the checker finds a
violation."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from soak.process import RelayStartFailed
from soak.run import DEFAULT_RESULTS, Config, run_soak


def main(argv: list[str] | None = None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="load phase")
    parser.add_argument(
        "--streams", type=int, default=defaults.streams, help="chats driven at once"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kills", type=int, default=defaults.kills, help="at most this many")
    parser.add_argument("--journal-interval-ms", type=float, default=defaults.journal_interval_ms)
    parser.add_argument(
        "--loss-slack-s",
        type=float,
        default=defaults.loss_slack_s,
        help="allowance beyond the journal window for chunks lost at a kill",
    )
    parser.add_argument("--max-ops", type=int, default=defaults.max_ops)
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="directory for <date>.md (default soak/results)",
    )
    parser.add_argument("--no-results", action="store_true", help="print only")
    args = parser.parse_args(argv)
    config = Config(
        seconds=args.seconds,
        streams=args.streams,
        seed=args.seed,
        kills=args.kills,
        journal_interval_ms=args.journal_interval_ms,
        loss_slack_s=args.loss_slack_s,
        max_ops=args.max_ops,
        results_dir=None if args.no_results else args.results,
    )
    try:
        outcome = asyncio.run(run_soak(config))
    except RelayStartFailed as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print(outcome.summary)
    if outcome.results_path is not None:
        print(f"\nwritten to {outcome.results_path}")
    return 1 if outcome.report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
