"""What a run is evaluated on: the layouts of its before/after evaluation, and what that leaves to train on.

``eval.data`` picks them (`eval_data`):
- ``''`` (the default): the training data's own. For ``--data shapes`` the fixed held-out Shapes set
  (`held_out_layouts(eval.layouts, eval.levels, eval.seed)`, as always). For ``--data FILE`` a held-out part of
  FILE: ``eval.holdout`` of its layouts (at least 1, at most ``eval.layouts``), drawn by a permutation seeded with
  ``eval.seed``, so the same file and seed hold out the same layouts; training never sees them.
- ``shapes``: the held-out Shapes set, whatever the training data.
- a file of layouts (diffrl JSONL, COCO-MIG, LayoutSAM-eval; `diffrl.eval.readers`): all of its layouts. The
  training file itself is held out from as with ``''``.

`load_layouts` is the same reading for ``diffrl eval --data``, so both commands see the same layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from diffrl.envs.datasets import shapes_world  # (also registers the dataset names, "shapes")
from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.registry import DATASETS
from diffrl.shapes.world import sample_layouts


@dataclass
class EvalData:
    layouts: list[Layout]  # the evaluation set, in a fixed order
    name: str  # what they are, for the printed summary and summary.json
    train_layouts: list[Layout] | None = None  # the --data file without the held-out layouts (None: --data as is)
    held_out: int = 0  # how many layouts of the --data file were held out of training
    default: bool = False  # the Shapes held-out set of a Shapes run (what diffrl train always evaluated on)


def held_out_layouts(n: int, levels: Sequence[int], seed: int, world: str = "classic") -> list[Layout]:
    """A fixed-seed evaluation set of a Shapes ``world``'s layouts (`diffrl.shapes.world.WORLDS`) spread evenly over
    ``levels`` (round-robin)."""
    return sample_layouts(n, list(levels), seed=seed, balanced=True, world=world)


def load_layouts(data: str, format: str = "auto", *, layouts: int = 250, levels: Sequence[int] = (2, 3, 4, 5, 6),
                 seed: int = 1234) -> list[Layout]:
    """``shapes`` → the held-out Shapes set of ``layouts`` over ``levels``; a file → every layout in it."""
    from diffrl.eval.readers import read_layouts

    if (world := shapes_world(data)) is not None:
        return held_out_layouts(layouts, levels, seed, world)
    if data in DATASETS:
        raise UserError(f"eval.data {data}: only the Shapes dataset has a held-out set; pass a file of layouts")
    if not Path(data).is_file():
        raise UserError(f"eval.data {data}: no such file (pass shapes or a file of layouts)")
    return read_layouts(data, format)


def split_holdout(layouts: Sequence[Layout], fraction: float, most: int,
                  seed: int) -> tuple[list[Layout], list[Layout]]:
    """→ (held out, the rest), each in file order: ``round(fraction · N)`` layouts (≥ 1, ≤ ``most``, ≤ N − 1) chosen
    by a permutation of ``torch.Generator().manual_seed(seed)``."""
    n = min(most, max(1, round(fraction * len(layouts))), len(layouts) - 1)
    if n < 1:
        raise UserError(f"the --data file has {len(layouts)} layout(s): too few to hold any out for evaluation; pass "
                        "eval.data=FILE (or eval.holdout=0 to evaluate on the training layouts)")
    chosen = set(torch.randperm(len(layouts), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return ([l for i, l in enumerate(layouts) if i in chosen], [l for i, l in enumerate(layouts) if i not in chosen])


def eval_data(cfg) -> EvalData:
    """The run's evaluation set from its config (``cfg``: a `diffrl.config.TrainConfig`; module docstring)."""
    e, train_data = cfg.eval, cfg.env.data
    if shapes_world(e.data) or (not e.data and shapes_world(train_data)):
        world = shapes_world(e.data or train_data)
        levels = sorted(e.levels)
        contiguous = len(levels) > 2 and levels == list(range(levels[0], levels[-1] + 1))
        levels = f"{levels[0]}–{levels[-1]}" if contiguous else ", ".join(map(str, levels))
        return EvalData(held_out_layouts(e.layouts, e.levels, e.seed, world),
                        f"{e.layouts} held-out Shapes layouts (levels {levels}, seed {e.seed}"
                        + (f", the {world} world)" if world != "classic" else ")"),
                        default=train_data == "shapes" and not e.data)
    training_file = train_data not in DATASETS and (not e.data or _same_file(e.data, train_data))
    if not training_file:
        layouts = load_layouts(e.data)
        return EvalData(layouts, f"{len(layouts)} layouts of {e.data}")
    from diffrl.layout import read_jsonl

    every = read_jsonl(train_data)
    if e.holdout == 0:
        layouts = every[: e.layouts]
        return EvalData(layouts, f"{len(layouts)} layouts of {train_data} (also trained on: eval.holdout=0)")
    held, rest = split_holdout(every, e.holdout, e.layouts, e.seed)
    return EvalData(held, f"{len(held)} layouts of {train_data} held out of training ({len(rest)} train)",
                    train_layouts=rest, held_out=len(held))


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
