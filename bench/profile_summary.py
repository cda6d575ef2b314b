"""Summarises py-spy raw (collapsed) profiles: where the relay spends its samples.

    python -m bench --only s1,s2 --profile /tmp/prof       # records them (py-spy, the relay's pid)
    python -m bench.profile_summary /tmp/prof/s1-grpc-relay.txt [--top 25]

Prints the functions with the most samples on top of the stack ("self") and anywhere in it
("inclusive"), as percentages of all samples, and the same grouped by source file.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def load(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            frames.append((match["function"], match["file"]) if match else (frame, "?"))
        stacks.append((frames, int(count)))
    return stacks


def summarise(path: Path, top: int) -> str:
    stacks = load(path)
    total = sum(count for _, count in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        function, file = frames[-1]
        own[f"{function} ({file})"] += count
        files[file] += count
        for name in {f"{f} ({p})" for f, p in frames}:
            inclusive[name] += count
    out = [f"{path.name}: {total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive), ("self, by file", files)):
        out.append(f"\n  {title}:")
        out += [f"  {n / total:6.1%}  {name}" for name, n in counter.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
