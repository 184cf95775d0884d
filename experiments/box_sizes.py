"""Which instances does a run fix: ISR by box size and by asked-for shape, base against each run's final weights.

    python experiments/box_sizes.py RUN [RUN ...] [--threads 2] [--json PATH]

COCO reports AP by object size; this reports the Shapes world's per-instance success the same way. Each RUN is a
`diffrl train` folder on the Shapes world; all must share their held-out set (``eval.*``) and model. The base row is
the model the first run started from. An instance's size is the shorter side of its box, in cells of the world's
32-cell grid (the canvas is 32 px, so cells are pixels): ``≤ 8``, ``9–10`` and ``≥ 11``. Each cell of the table is
ISR (successes / instances), and the base row gives the instance counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffrl.algos.export import load_run
from diffrl.envs.datasets import shapes_world
from diffrl.errors import UserError
from diffrl.eval.evaluate import generate, held_out_layouts
from diffrl.eval.metrics import summarize
from diffrl.layout import Layout
from diffrl.policies.generator import build_generator
from diffrl.rewards import build_reward
from diffrl.shapes.world import GRID, SHAPES, parse_phrase

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)

SIZE_BINS = (("≤ 8", 0, 8), ("9–10", 9, 10), ("≥ 11", 11, GRID))


def size_bin(box) -> str:
    """The SIZE_BINS name of a normalised xyxy box: its shorter side in grid cells."""
    x0, y0, x1, y1 = box
    side = round(min(x1 - x0, y1 - y0) * GRID)
    return next(name for name, lo, hi in SIZE_BINS if lo <= side <= hi)


def instance_groups(layouts: list[Layout]) -> dict[str, list[tuple[int, int]]]:
    """{column name: [(image, instance), ...]} for each size bin and each shape."""
    groups: dict[str, list[tuple[int, int]]] = {name: [] for name, _, _ in SIZE_BINS}
    groups.update({shape: [] for shape in SHAPES})
    for i, layout in enumerate(layouts):
        for j, box in enumerate(layout.boxes):
            groups[size_bin(box)].append((i, j))
            groups[parse_phrase(layout.phrases[j])[1]].append((i, j))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of `diffrl train` on the Shapes world")
    parser.add_argument("--threads", type=int, default=2)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        loaded = [load_run(run) for run in args.runs]
    except UserError as err:
        parser.error(str(err))  # one line on stderr, exit code 2
    cfg = loaded[0][0]
    for run, (other, _) in zip(args.runs, loaded):
        if (other.eval, other.model.name, other.env.data) != (cfg.eval, cfg.model.name, cfg.env.data):
            parser.error(f"{run}: its held-out set, model or data differ from {args.runs[0]}'s; "
                         "compare runs that share them")
    world = shapes_world(cfg.env.data)
    if world is None or cfg.reward.name != "shapes":
        parser.error(f"{args.runs[0]}: box sizes and shapes are read from the Shapes world; this run used "
                     f"--data {cfg.env.data} --reward {cfg.reward.name}")
    reward = build_reward(cfg.reward.name, cfg.reward.model or None)
    layouts = held_out_layouts(cfg.eval.layouts, cfg.eval.levels, cfg.eval.seed, world)
    groups = instance_groups(layouts)
    kwargs = dict(num_steps=cfg.env.num_steps, shift=cfg.env.shift, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
    models = [("base", build_generator(cfg.model, cfg.policy.train))] + [(str(run), g) for run, (_, g) in
                                                                         zip(args.runs, loaded)]
    print(f"{len(layouts)} held-out layouts (levels {cfg.eval.levels}, seed {cfg.eval.seed}); box size = shorter side "
          f"in cells of {GRID}")
    print("| model | ISR | " + " | ".join(f"size {name}" for name, _, _ in SIZE_BINS) + " | "
          + " | ".join(SHAPES) + " |")
    print("|---" * (2 + len(groups)) + "|")
    rows = []
    for name, generator in models:
        scored = reward(generate(generator, layouts, desc=name, **kwargs), layouts)  # the images `evaluate` scores
        summary, success = summarize([scored], layouts), scored.info["success"].cpu()
        cells, isr = [], {}
        for column, members in groups.items():
            hits = sum(bool(success[i, j]) for i, j in members)
            isr[column] = {"isr": hits / len(members) if members else None, "instances": len(members)}
            cells.append(f"{hits / len(members):.3f}" + (f" ({len(members)})" if name == "base" else "")
                         if members else "–")
        print(f"| {name} | {summary['isr']:.3f} | " + " | ".join(cells) + " |", flush=True)
        rows.append({"model": name, "isr": summary["isr"], "by_column": isr})
    write_json(args, __file__, layouts=len(layouts), levels=cfg.eval.levels, seed=cfg.eval.seed, grid=GRID, rows=rows)


if __name__ == "__main__":
    main()
