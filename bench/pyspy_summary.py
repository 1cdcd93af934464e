"""Summarize a `py-spy record --threads --format raw` profile of shipper, thread by thread.

    .venv/bin/python bench/throughput.py --only shipper \\
        --py-spy --threads --nonblocking --rate 250 --format raw -o /tmp/profile.txt
    .venv/bin/python bench/pyspy_summary.py /tmp/profile.txt [--top 12]

Threads are named from their stacks (input reader, output runner, thread pool, main, other). For each:
its share of samples, the functions where the samples land (self), and the inclusive
share of the frames that matter on the hot path.
"""

from __future__ import annotations

import argparse
import collections
import re

ROLES = (("OutputRunner.run", "output"), ("_run_input", "input"), ("_worker (concurrent", "pool"),
         ("<module> (shipper", "main"))
_FRAME = re.compile(r"^(.*?) \((.*?)(?::(\d+))?\)$")


def role_of(frames: list[str]) -> str:
    for marker, role in ROLES:
        if any(marker in frame for frame in frames):
            return role
    return "other"


def short(frame: str, with_line: bool) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    name, path, line = match.groups()
    path = re.sub(r".*/(site-packages|python3\.\d+|lib)/", "", path)
    path = re.sub(r".*/shipper/", "shipper/", path)
    return f"{name} ({path}:{line})" if with_line and line else f"{name} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--lines", action="store_true", help="keep line numbers in self-time frames")
    args = parser.parse_args()
    per_role: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    with open(args.profile) as handle:
        for raw in handle:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, _, count = raw.rpartition(" ")
            count = int(count)
            frames = stack.split(";")
            if frames and frames[0].startswith("thread"):
                frames = frames[1:]
            role = role_of(frames)
            totals[role] += count
            per_role[role][short(frames[-1], args.lines) if frames else "?"] += count
            for frame in set(short(f, False) for f in frames):
                inclusive[role][frame] += count
    grand = sum(totals.values())
    print(f"{grand} samples")
    for role, total in totals.most_common():
        print(f"\n== {role}: {total} samples ({total / grand:.0%})")
        print("  self:")
        for frame, count in per_role[role].most_common(args.top):
            print(f"    {count / total:6.1%}  {frame}")
        print("  inclusive:")
        for frame, count in inclusive[role].most_common(args.top):
            print(f"    {count / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()
