"""The Shapes attribute-leakage metric: its probe layouts, hand-painted images that leak and that do not, and
`diffrl eval`'s leakage block."""

import json

import torch

from diffrl.cli import main
from diffrl.eval.leakage import instance_leakage, leakage_layouts, leakage_metrics
from diffrl.layout import Layout
from diffrl.shapes.detector import classify_pixels
from diffrl.shapes.world import BACKGROUND, COLORS, GRID, parse_phrase, render


def _pair(relation_overlap: int = 2) -> Layout:
    # A red square in cells x 4..12, y 8..16 (8×8 = 64 px on a 32-px image: one pixel per grid cell) and a blue square
    # to its right starting at x = 12 − overlap.
    x0 = 12 - relation_overlap
    return Layout("a red square and a blue square", ["red square", "blue square"],
                  [(4 / 32, 8 / 32, 12 / 32, 16 / 32), (x0 / 32, 8 / 32, (x0 + 8) / 32, 16 / 32)])


def _canvas() -> torch.Tensor:
    return torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(1, 1, 32, 32)


def _paint(image: torch.Tensor, color, x0: int, x1: int, y0: int = 8, y1: int = 16) -> None:
    rgb = torch.tensor(COLORS[color] if isinstance(color, str) else color).view(3, 1, 1)
    image[0, :, y0:y1, x0:x1] = rgb


def test_probe_layouts_are_same_shape_different_colour_pairs_that_touch_or_overlap():
    layouts = leakage_layouts(40, seed=3)
    assert layouts == leakage_layouts(40, seed=3) and layouts != leakage_layouts(40, seed=4)
    overlaps = []
    for layout in layouts:
        (c1, s1), (c2, s2) = (parse_phrase(p) for p in layout.phrases)
        assert s1 == s2 and c1 != c2
        a, b = (torch.tensor(box) * GRID for box in layout.boxes)
        assert torch.equal(a, a.round()) and torch.equal(b, b.round())  # on the world's grid
        assert a.min() >= 0 and b.max() <= GRID
        gap_x = torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])  # > 0 overlap, 0 touch, < 0 apart
        gap_y = torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])
        assert min(gap_x, gap_y) >= 0 and max(gap_x, gap_y) >= 3  # meet along an edge of at least 3 cells
        overlaps.append(bool(min(gap_x, gap_y) > 0))
    assert overlaps[0::2] == [False] * 20 and overlaps[1::2] == [True] * 20  # alternating adjacent / overlapping


def test_the_renderers_own_images_do_not_leak():
    layouts = leakage_layouts(30, seed=0)
    found = instance_leakage(render(layouts), layouts)
    assert found["counted"].all() and not found["leaked"].any()
    # a drawn pair overlaps: the second instance is painted over the first in the overlap, which never counts
    # against the first, so every instance's own region is its own colour
    assert found["own"].all()
    assert leakage_metrics(render(layouts), layouts) == {"leakage": 0.0, "own_colour": 1.0, "neighbour_pixels": 0.0,
                                                         "instances": 60, "layouts": 30}


def test_hand_painted_leaks_by_the_dominant_colour_of_each_instances_own_region():
    layout = _pair(relation_overlap=2)  # red box x 4..12, blue box x 10..18: they overlap in columns 10, 11
    # Own regions (box minus the other box): red x 4..10 (6 columns × 8 rows = 48 px), blue x 12..18 (48 px).
    # 1. Red paint in columns 4..6 (3 × 8 = 24 px), blue from column 7 on: red's region is 24 red + 24 blue → a tie,
    #    which goes to its own colour: no leak. Blue's region is 48 blue: its own. (This is where leaving the overlap
    #    out matters: the whole red box would be 24 red vs 40 blue px — a leak that is only the neighbour's overlap.)
    image = _canvas()
    _paint(image, "red", 4, 7)
    _paint(image, "blue", 7, 18)
    found = instance_leakage(image, [layout])
    assert found["leaked"].tolist() == [[False, False]] and found["own"].tolist() == [[True, True]]
    assert found["neighbour_pixels"].tolist() == [[0.5, 0.0]]  # 24 of red's 48 object pixels are blue
    # 2. One more blue column: 16 red vs 32 blue px → blue dominates red's region, the neighbour's colour: leaked.
    image = _canvas()
    _paint(image, "red", 4, 6)
    _paint(image, "blue", 6, 18)
    assert instance_leakage(image, [layout])["leaked"].tolist() == [[True, False]]
    metrics = leakage_metrics(image, [layout])
    assert abs(metrics.pop("neighbour_pixels") - (32 / 48 + 0) / 2) < 1e-6  # red: 32 of 48 blue; blue: none red
    assert metrics == {"leakage": 0.5, "own_colour": 0.5, "instances": 2, "layouts": 1}
    # 3. Drawn as the renderer would (blue over the overlap): red's region is 48 red, blue's 48 blue — no leak.
    image = _canvas()
    _paint(image, "red", 4, 10)
    _paint(image, "blue", 10, 18)
    assert instance_leakage(image, [layout])["leaked"].tolist() == [[False, False]]
    # 4. A third colour dominating is wrong but not leakage; pixels of no palette colour (violet (0.6, 0, 0.9): ≥ 0.56
    #    from every palette colour and the background, so "unknown") are left out: red's region has 8 red px
    #    (column 4) and 40 violet → red.
    image = _canvas()
    _paint(image, "green", 4, 10)
    _paint(image, "blue", 10, 18)
    found = instance_leakage(image, [layout])
    assert found["leaked"].tolist() == [[False, False]] and found["own"].tolist() == [[False, True]]
    assert found["dominant"][0, 0] == list(COLORS).index("green")
    image = _canvas()
    _paint(image, "red", 4, 5)
    _paint(image, (0.6, 0.0, 0.9), 5, 10)
    assert classify_pixels(image)[0, 8, 5] == -1  # violet is unknown to the detector
    _paint(image, "blue", 10, 18)
    found = instance_leakage(image, [layout])
    assert found["own"].tolist() == [[True, True]] and not found["leaked"].any()
    assert found["neighbour_pixels"].tolist() == [[0.0, 0.0]]  # 8 red, 0 blue among red's object pixels
    # 5. Nothing drawn at all: counted, neither leaked nor its own colour.
    found = instance_leakage(_canvas(), [layout])
    assert found["counted"].all() and not found["leaked"].any() and not found["own"].any()
    assert found["dominant"].tolist() == [[-1, -1]]


def test_only_instances_with_a_touching_neighbour_of_another_colour_count():
    # red and blue touch (red x 4..12, blue x 12..20); a green square far away at x 24..30; a second red touching
    # the first red from below (same colour: not a neighbour for leakage) — only red₁ and blue are counted
    layout = Layout("p", ["red square", "blue square", "green square", "red square"],
                    [(4 / 32, 8 / 32, 12 / 32, 16 / 32), (12 / 32, 8 / 32, 20 / 32, 16 / 32),
                     (24 / 32, 8 / 32, 30 / 32, 14 / 32), (4 / 32, 16 / 32, 10 / 32, 24 / 32)])
    image = _canvas()
    _paint(image, "blue", 4, 20)  # blue takes over red₁'s box
    found = instance_leakage(image, [layout])
    assert found["counted"].tolist() == [[True, True, False, False]]
    assert found["leaked"].tolist() == [[True, False, False, False]]


def test_eval_reports_leakage_beside_isr_and_miou(tmp_path, saved_generator, capsys):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(saved_generator), "--layouts", "4", "--levels", "2", "--steps", "2",
                 "--leakage", "6", "--out", str(report), "--quiet"]) == 0
    metrics = json.loads(report.read_text())
    block = metrics["leakage"]
    assert block["layouts"] == 6 and block["instances"] == 12 and block["seed"] == 1234
    assert 0 <= block["leakage"] <= 1 and 0 <= block["own_colour"] <= 1 and block["leakage"] + block["own_colour"] <= 1
    assert 0 <= block["neighbour_pixels"] <= 1
    assert "isr" in metrics and "attribute leakage" in capsys.readouterr().out
    assert main(["eval", "--model", str(saved_generator), "--layouts", "4", "--levels", "2", "--steps", "2",
                 "--leakage", "0", "--out", str(report), "--quiet"]) == 0
    assert "leakage" not in json.loads(report.read_text())
    layouts = tmp_path / "layouts.jsonl"
    one = {"prompt": "a red square", "phrases": ["red square"], "boxes": [[0.1, 0.1, 0.5, 0.5]]}
    layouts.write_text(json.dumps(one) + "\n")
    capsys.readouterr()
    assert main(["eval", "--data", str(layouts), "--leakage", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --data shapes" in err[0]
