"""Attribute leakage in the Shapes world: does an instance take its neighbour's colour?

The probe set (`leakage_layouts`): layouts of two instances of the *same shape* and *different colours*
whose boxes touch (share an edge, no gap) or overlap (by 1 to a third of the smaller side), along an edge
at least 3 cells long — the setting where I-DRUID's "attribute leakage" shows: the generator has to tell
two otherwise identical objects apart by colour alone, right next to each other.

The metric (`leakage_metrics`), per image, on the detector's pixel classes (`diffrl.shapes.detector`
rule 1: each pixel is its nearest palette colour, the background, or unknown):

* the **neighbours** of instance i are the other instances of another colour whose boxes touch or
  overlap box i (closed boxes intersect); an instance without one is not counted;
* its **own region** is its box minus every other box of the layout (pixel centres), so a neighbour
  legitimately drawn in an overlap never counts against it;
* its **dominant colour** is the palette colour (background and unknown pixels left out) with the most
  pixels in its own region, ties going to its own colour; no object pixel at all: none;
* it is **leaked** when its dominant colour is a neighbour's colour.

``leakage`` = leaked / counted instances; ``own_colour`` = the fraction whose dominant colour is their own
(the rest drew another colour, or nothing, in their box). ``neighbour_pixels`` is the graded version:
per counted instance, the fraction of its own region's object pixels that have a neighbour's colour (0
without object pixels), averaged — it moves long before a neighbour's colour takes a whole instance over.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from diffrl.layout import Layout
from diffrl.shapes.detector import classify_pixels
from diffrl.shapes.world import COLORS, GRID, MIN_SIDE, SHAPES, parse_phrase, phrase_of, prompt_of

MAX_SIDE = 12  # grid cells; two boxes of this size fit side by side with room to move
MIN_SHARED = 3  # grid cells of edge the two boxes share
RELATIONS = ("adjacent", "overlapping")


def leakage_layouts(n: int, seed: int = 0) -> list[Layout]:
    """``n`` two-instance probe layouts, alternating adjacent / overlapping, deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def integer(lo: int, hi: int) -> int:  # uniform on lo..hi inclusive
        return lo + int(torch.randint(hi - lo + 1, (), generator=g))

    colors = list(COLORS)
    layouts = []
    for i in range(n):
        shape = SHAPES[integer(0, len(SHAPES) - 1)]
        first = integer(0, len(colors) - 1)
        second = (first + integer(1, len(colors) - 1)) % len(colors)  # any other colour
        sides = [(integer(MIN_SIDE, MAX_SIDE), integer(MIN_SIDE, MAX_SIDE)) for _ in range(2)]  # (along, across)
        depth = 0 if RELATIONS[i % 2] == "adjacent" else integer(1, min(s[0] for s in sides) // 3)
        (la, ca), (lb, cb) = sides
        a0 = integer(0, GRID - (la + lb - depth))  # along the axis the boxes meet on
        b0 = a0 + la - depth
        while True:  # across that axis: share at least MIN_SHARED cells of edge
            ca0, cb0 = integer(0, GRID - ca), integer(0, GRID - cb)
            if min(ca0 + ca, cb0 + cb) - max(ca0, cb0) >= MIN_SHARED:
                break
        boxes = [(a0, ca0, a0 + la, ca0 + ca), (b0, cb0, b0 + lb, cb0 + cb)]  # (along0, across0, along1, across1)
        if integer(0, 1):  # meet on a horizontal edge instead: swap the axes
            boxes = [(c0, a, c1, b) for a, c0, b, c1 in boxes]
        boxes = [tuple(v / GRID for v in box) for box in boxes]
        phrases = [phrase_of(colors[first], shape), phrase_of(colors[second], shape)]
        layouts.append(Layout(prompt_of(phrases), phrases, boxes))
    return layouts


def leakage_metrics(images: Tensor, layouts: Sequence[Layout]) -> dict:
    """images [B, 3, H, W] in [0, 1] with their layouts → the block written to eval.json (see the module doc)."""
    found = instance_leakage(images, layouts)
    counted = found["counted"]
    n = int(counted.sum())
    return {
        "leakage": float(found["leaked"][counted].float().mean()) if n else 0.0,
        "own_colour": float(found["own"][counted].float().mean()) if n else 0.0,
        "neighbour_pixels": float(found["neighbour_pixels"][counted].mean()) if n else 0.0,
        "instances": n,
        "layouts": len(layouts),
    }


def instance_leakage(images: Tensor, layouts: Sequence[Layout]) -> dict[str, Tensor]:
    """Per instance, padded to the largest layout: ``counted``, ``leaked``, ``own`` [B, K] bool, ``dominant`` [B, K]
    long (palette index into COLORS, −1: no object pixel or not counted) and ``neighbour_pixels`` [B, K] float."""
    classes = classify_pixels(images.detach().float().cpu())  # [B, H, W]
    b, k = len(layouts), max(layout.n for layout in layouts)
    size_h, size_w = classes.shape[-2:]
    ys = (torch.arange(size_h, dtype=torch.float32) + 0.5) / size_h
    xs = (torch.arange(size_w, dtype=torch.float32) + 0.5) / size_w
    counted = torch.zeros(b, k, dtype=torch.bool)
    leaked = torch.zeros(b, k, dtype=torch.bool)
    own = torch.zeros(b, k, dtype=torch.bool)
    dominant = torch.full((b, k), -1, dtype=torch.long)
    neighbour_pixels = torch.zeros(b, k)
    palette = list(COLORS)
    for i, layout in enumerate(layouts):
        colours = [palette.index(parse_phrase(p)[0]) for p in layout.phrases]
        boxes = torch.tensor(layout.boxes, dtype=torch.float32)  # [n, 4]
        inside = ((xs[None, None, :] >= boxes[:, 0, None, None]) & (xs[None, None, :] < boxes[:, 2, None, None])
                  & (ys[None, :, None] >= boxes[:, 1, None, None]) & (ys[None, :, None] < boxes[:, 3, None, None]))
        for j in range(layout.n):
            others = [o for o in range(layout.n) if o != j]
            neighbours = {colours[o] for o in others if colours[o] != colours[j] and _touch(boxes[j], boxes[o])}
            if not neighbours:
                continue
            counted[i, j] = True
            region = inside[j] & ~inside[others].any(dim=0)  # [H, W] own box minus every other box
            pixels = classes[i][region]
            counts = torch.bincount(pixels[(pixels >= 0) & (pixels < len(palette))], minlength=len(palette))
            if counts.sum() == 0:
                continue
            neighbour_pixels[i, j] = counts[sorted(neighbours)].sum() / counts.sum()
            best = colours[j] if counts[colours[j]] == counts.max() else int(counts.argmax())  # ties: its own
            dominant[i, j] = best
            leaked[i, j] = best in neighbours
            own[i, j] = best == colours[j]
    return {"counted": counted, "leaked": leaked, "own": own, "dominant": dominant,
            "neighbour_pixels": neighbour_pixels}


def _touch(a: Tensor, b: Tensor) -> bool:
    """Closed boxes [4] intersect: they overlap or share (part of) an edge."""
    return bool(a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3])


@torch.no_grad()
def evaluate_leakage(generator, n: int, *, num_steps: int, seed: int = 1234, shift: float = 0.0,
                     batch_size: int = 125, progress: bool = True) -> dict:
    """Generate the ``n`` probe layouts (ODE sampling, as `diffrl.eval.evaluate`) and measure their leakage."""
    from diffrl.eval.evaluate import generate

    layouts = leakage_layouts(n, seed)
    images = generate(generator, layouts, num_steps=num_steps, shift=shift, batch_size=batch_size, seed=seed,
                      progress=progress, desc="eval leakage")
    return {**leakage_metrics(images, layouts), "seed": seed}
