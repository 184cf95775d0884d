"""Do two `diffrl train` runs give the same numbers? A refactor's check: the same learner and seed on the code before
and after must agree bit for bit, timing aside.

    python experiments/same_numbers.py RUN_BEFORE RUN_AFTER [--json PATH]

Compares metrics.jsonl line by line, base.json and summary.json with every timing key removed ("seconds", "time",
"wall_seconds", "wall_seconds_so_far" and any key ending in "_s" or "_seconds"), and config.yaml with each run's own
folder name replaced. Prints one line per file and exits 1 when any differs. How it was used (2026-12-07): for A in
ppo grpo awm nft, `diffrl train --algo A --iterations 2 env.layouts_per_iter=16 eval.layouts=50 --out DIR/A` with
`PYTHONPATH` on a checkout of each commit, one torch thread, then this script on each pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _results import add_json_option, write_json

FILES = ("metrics.jsonl", "base.json", "summary.json", "config.yaml")


def is_timing(key: str) -> bool:
    return key in ("seconds", "time", "wall_seconds", "wall_seconds_so_far") or key.endswith(("_s", "_seconds"))


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not is_timing(k)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def content(run: Path, name: str) -> str:
    text = (run / name).read_text()
    if name == "metrics.jsonl":
        return "\n".join(json.dumps(untimed(json.loads(line))) for line in text.splitlines() if line.strip())
    if name == "config.yaml":
        return text.replace(str(run), "RUN")
    return json.dumps(untimed(json.loads(text)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    same = {name: content(args.before, name) == content(args.after, name) for name in FILES}
    for name, equal in same.items():
        print(f"{name:14} {'identical' if equal else 'DIFFERENT'}")
    write_json(args, __file__, identical=same)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
