"""Held-out layouts drawn differently from the training source, to check that a gain is not the source's alone.

    python experiments/ood_layouts.py [--out experiments/ood_layouts.jsonl] [--n 125] [--seed 4321]

Writes a diffrl layouts JSONL (`diffrl eval --data FILE` reads it) of two halves, ``--n`` layouts each:

  large boxes     L1–L3 layouts whose boxes are 15–24 px (the training worlds stop at 19 / 16 / 14 px for L1 / L2 /
                  L3), touching allowed
  adjacent pairs  two same-shape, different-colour instances in boxes that share an edge of ≥ 3 px (the adjacent
                  half of `diffrl.eval.leakage`'s probe layouts: where one instance's colour can leak into the other)

Score a model or a run on it with ``diffrl eval --model M --data FILE`` / ``diffrl eval --checkpoint RUN --data FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffrl.eval.leakage import leakage_layouts
from diffrl.shapes.world import BoxRules, sample_layouts

LARGE = BoxRules(min_side=15, max_side={1: 24, 2: 20, 3: 16}, gap=0)


def ood_layouts(n: int, seed: int):
    large = sample_layouts(n, [1, 2, 3], seed=seed, balanced=True, world=LARGE)
    adjacent = leakage_layouts(2 * n, seed=seed)[0::2]  # the probe alternates adjacent / overlapping
    return large + adjacent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/ood_layouts.jsonl")
    parser.add_argument("--n", type=int, default=125)
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)
    layouts = ood_layouts(args.n, args.seed)
    Path(args.out).write_text("".join(json.dumps(layout.to_dict()) + "\n" for layout in layouts))
    print(f"wrote {len(layouts)} layouts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
