"""The Shapes world: layouts of 1–6 coloured shapes, a renderer for paired images, nothing to download.

Each instance's phrase is ``"<color> <shape>"`` with COCO-MIG's colour words; the shape fills its
box (square = the box, circle = the inscribed ellipse, triangle = apex at the top centre, base on
the bottom edge) on a plain grey background. Boxes of a layout never overlap. The level of a
layout is its instance count, L1–L6 as in COCO-MIG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from diffrl.layout import Layout, LayoutError

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "yellow": (0.95, 0.85, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.25, 0.9),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}
BACKGROUND = (0.5, 0.5, 0.5)
SHAPES = ("square", "circle", "triangle")
LEVELS = (1, 2, 3, 4, 5, 6)

GRID = 32  # box corners lie on a 32×32 grid, so a perfect 32-px image matches its boxes exactly


@dataclass(frozen=True)
class BoxRules:
    """How a world draws boxes on the grid: side lengths (grid cells) and the free cells kept between boxes."""

    min_side: int  # grid cells
    max_side: dict  # level → largest side
    gap: int  # free cells between two boxes (0: boxes may touch)


# The classic world of shapes-tiny (the hard benchmark): sides 7–19 px, one free cell between boxes. Two
# instances in three then sit in boxes of ≤ 8 px, where the drawn shape is re-decided by the noise at every step.
CLASSIC = BoxRules(min_side=7, max_side={1: 19, 2: 16, 3: 14, 4: 13, 5: 12, 6: 10}, gap=1)
# The loose-box world of the default (`shapes-loose`): sides 9–19 px, so a shape is drawable wherever RL moves a
# box, and boxes may touch, as in COCO-MIG, so neighbours can leak attributes into each other.
LOOSE = BoxRules(min_side=9, max_side={1: 19, 2: 16, 3: 14, 4: 13, 5: 12, 6: 11}, gap=0)
WORLDS = {"classic": CLASSIC, "loose": LOOSE}

MIN_SIDE = CLASSIC.min_side  # the classic world's, for code that builds its own boxes (eval.leakage)


def phrase_of(color: str, shape: str) -> str:
    return f"{color} {shape}"


def parse_phrase(phrase: str) -> tuple[str, str]:
    """``"red square"`` → ("red", "square"); a phrase outside the world raises LayoutError."""
    words = phrase.strip().lower().split()
    if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
        raise LayoutError(
            f"phrase {phrase!r} is not in the Shapes world: use '<color> <shape>' with colors "
            f"{', '.join(COLORS)} and shapes {', '.join(SHAPES)}"
        )
    return words[0], words[1]


def prompt_of(phrases: Sequence[str]) -> str:
    """``a red square, a blue circle and a green triangle``."""
    items = [f"a {p}" for p in phrases]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sample_boxes(n: int, generator: torch.Generator, rules: BoxRules = CLASSIC) -> list[tuple[float, float, float, float]]:
    def integer(lo: int, hi: int) -> int:  # uniform on lo..hi inclusive
        return lo + int(torch.randint(hi - lo + 1, (), generator=generator))

    while True:  # restart the layout if a box does not fit after many tries
        cells: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            for _ in range(200):
                w = integer(rules.min_side, rules.max_side[n])
                aspect = 0.6 + torch.rand((), generator=generator).item()
                h = min(max(round(w * aspect), rules.min_side), rules.max_side[n])
                x0, y0 = integer(0, GRID - w), integer(0, GRID - h)
                box = (x0, y0, x0 + w, y0 + h)
                if all(_apart(box, other, rules.gap) for other in cells):
                    cells.append(box)
                    break
            else:
                break
        if len(cells) == n:
            return [tuple(v / GRID for v in box) for box in cells]


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_layouts(
    n: int,
    levels: Sequence[int] = LEVELS,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    balanced: bool = False,
    world: str | BoxRules = "classic",
) -> list[Layout]:
    """``n`` random layouts of ``world``'s box rules (a name in `WORLDS`, or rules of one's own); the level is uniform
    over ``levels`` (round-robin when ``balanced``)."""
    rules = WORLDS[world] if isinstance(world, str) else world
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    colors, shapes = list(COLORS), list(SHAPES)
    layouts = []
    for i in range(n):
        if balanced:
            level = levels[i % len(levels)]
        else:
            level = levels[torch.randint(len(levels), (), generator=generator).item()]
        boxes = _sample_boxes(level, generator, rules)
        phrases = [
            phrase_of(colors[torch.randint(len(colors), (), generator=generator).item()],
                      shapes[torch.randint(len(shapes), (), generator=generator).item()])
            for _ in range(level)
        ]
        layouts.append(Layout(prompt_of(phrases), phrases, boxes))
    return layouts


def loosen(layouts: Sequence[Layout], margin: float, generator: torch.Generator, shift: float = 0.0) -> list[Layout]:
    """The same layouts as a careless annotator or a biased detector would box them, the boxes a layout model is
    trained on when they come from such a source: each box grown by m·(its width, its height) on every side,
    m ~ U[0, margin] per instance, then moved by ``shift`` grid cells right and down, clipped to the canvas. The
    object still fills the *original* box in the paired render, so a model trained on these draws its objects
    inside (``margin``) or up-left of (``shift``) the box it is given."""
    out = []
    for layout in layouts:
        boxes = []
        for x0, y0, x1, y1 in layout.boxes:
            m = margin * torch.rand((), generator=generator).item() if margin else 0.0
            dx, dy, s = m * (x1 - x0), m * (y1 - y0), shift / GRID
            boxes.append((max(0.0, x0 - dx + s), max(0.0, y0 - dy + s), min(1.0, x1 + dx + s), min(1.0, y1 + dy + s)))
        out.append(Layout(layout.prompt, list(layout.phrases), boxes))
    return out


CONFUSABLE = {"yellow": "white", "white": "yellow", "green": "blue", "blue": "green", "red": "black", "black": "red"}


def mislabel(layouts: Sequence[Layout], p: float, generator: torch.Generator) -> list[Layout]:
    """The same layouts with each instance's colour word swapped, with probability ``p``, for its look-alike in
    `CONFUSABLE`: the noisy captions a layout model is trained on when its phrases come from a captioner or a
    hurried annotator. The paired render keeps the *true* colour, so a model trained on these draws the asked-for
    colour only most of the time."""
    out = []
    for layout in layouts:
        phrases = []
        for phrase in layout.phrases:
            color, shape = parse_phrase(phrase)
            if torch.rand((), generator=generator).item() < p:
                color = CONFUSABLE[color]
            phrases.append(phrase_of(color, shape))
        out.append(Layout(prompt_of(phrases), phrases, list(layout.boxes)))
    return out


def shape_mask(shape: str, boxes: Tensor, size: int) -> Tensor:
    """[K, 4] normalised boxes → [K, size, size] bool: pixel centres inside ``shape`` drawn in each box."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x = centres.view(1, 1, size)
    y = centres.view(1, size, 1)
    x0, y0, x1, y1 = (boxes[:, i].float().view(-1, 1, 1) for i in range(4))
    inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if shape == "square":
        return inside
    if shape == "circle":
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    if shape == "triangle":  # apex (cx, y0), base from (x0, y1) to (x1, y1)
        cx = (x0 + x1) / 2
        half_width = (x1 - x0) / 2 * (y - y0) / (y1 - y0)
        return inside & ((x - cx).abs() <= half_width)
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def render(layouts: Sequence[Layout], size: int = 32) -> Tensor:
    """Paired images for layouts: [B, 3, size, size] in [0, 1], instances painted in order."""
    images = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(len(layouts), 1, size, size)
    for i, layout in enumerate(layouts):
        boxes = torch.tensor(layout.boxes)
        for k, phrase in enumerate(layout.phrases):
            color, shape = parse_phrase(phrase)
            mask = shape_mask(shape, boxes[k : k + 1], size)[0]
            images[i, :, mask] = torch.tensor(COLORS[color]).view(3, 1)
    return images
