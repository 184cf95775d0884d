"""The Shapes world and its exact detector reward, against hand-computed answers."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl.eval.metrics import instance_metrics, summarize
from diffrl.layout import Layout, LayoutError
from diffrl.rewards import ShapesReward
from diffrl.shapes.detector import detect
from diffrl.shapes.world import GRID, render, sample_layouts, shape_mask


def layout(*instances):
    phrases = [p for p, _ in instances]
    return Layout(" and ".join(phrases), phrases, [b for _, b in instances])


def test_sampler_is_deterministic_levels_and_boxes_apart_on_the_grid():
    a = sample_layouts(60, [2, 4, 6], seed=3)
    assert a == sample_layouts(60, [2, 4, 6], seed=3)
    assert a != sample_layouts(60, [2, 4, 6], seed=4)
    assert {l.n for l in a} == {2, 4, 6}
    balanced = sample_layouts(9, [1, 2, 3], seed=0, balanced=True)
    assert [l.n for l in balanced] == [1, 2, 3] * 3
    for l in a:
        for i, b in enumerate(l.boxes):
            assert all(abs(v * GRID - round(v * GRID)) < 1e-9 for v in b)
            for c in l.boxes[i + 1:]:
                assert b[2] <= c[0] or c[2] <= b[0] or b[3] <= c[1] or c[3] <= b[1]


def test_shape_masks_have_the_expected_areas():
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]])  # 16×16 px at size 32
    assert shape_mask("square", box, 32).sum() == 256
    assert shape_mask("circle", box, 32).sum().item() / 256 == pytest.approx(np.pi / 4, abs=0.03)
    assert shape_mask("triangle", box, 32).sum().item() / 256 == pytest.approx(0.5, abs=0.04)


def test_ground_truth_renders_succeed_everywhere():
    layouts = sample_layouts(40, [1, 2, 3, 4, 5, 6], seed=1)
    d = detect(render(layouts), layouts)
    assert d.success[d.mask].all()
    square = torch.tensor([[p.endswith("square") for p in l.phrases] + [False] * (6 - l.n) for l in layouts])
    assert torch.all(d.iou[square] == 1) and torch.all(d.confidence[d.mask] > 0.9)


def square_confidence(side_px: int) -> float:
    """By hand: a clean square fits itself with IoU 1; the inscribed circle and triangle lie inside it, so
    their IoU with it is their area over its area; the confidence is softmax(fits / 0.05) at "square"."""
    box = torch.tensor([[0.0, 0.0, side_px / 32, side_px / 32]])
    area = side_px**2
    fits = [1.0, shape_mask("circle", box, 32).sum().item() / area, shape_mask("triangle", box, 32).sum().item() / area]
    weights = [np.exp(f / 0.05) for f in fits]
    return float(weights[0] / sum(weights))


def test_shifted_object_gives_the_hand_computed_iou():
    target = layout(("red square", (0.25, 0.25, 0.5, 0.5)))  # 8×8 px
    drawn = layout(("red square", (0.375, 0.25, 0.625, 0.5)))  # moved right by 4 px
    d = detect(render([drawn]), [target])
    assert d.iou[0, 0].item() == pytest.approx(32 / (64 + 64 - 32))  # overlap 4×8 = 32 px
    assert d.color_ok[0, 0] and d.shape_ok[0, 0] and not d.success[0, 0]  # IoU 1/3 < 0.5
    slightly = layout(("red square", (0.28125, 0.25, 0.53125, 0.5)))  # moved by 1 px: IoU 56/72
    d = detect(render([slightly]), [target])
    assert d.iou[0, 0].item() == pytest.approx(56 / 72) and d.success[0, 0]


def test_wrong_colour_and_wrong_shape_fail():
    box = (0.25, 0.25, 0.75, 0.75)
    target = layout(("red square", box))
    d = detect(render([layout(("blue square", box))]), [target])
    assert not d.color_ok[0, 0] and not d.success[0, 0] and d.iou[0, 0] == 0 and d.confidence[0, 0] == 0
    d = detect(render([layout(("red circle", box))]), [target])
    assert d.color_ok[0, 0] and not d.shape_ok[0, 0] and not d.success[0, 0]
    # a clean circle asked to be a square: fits (square π/4-ish, circle 1, triangle t) → a small probability
    box_t = torch.tensor([box])
    circle = shape_mask("circle", box_t, 32)[0]
    fits = [circle.sum().item() / 256, 1.0, (circle & shape_mask("triangle", box_t, 32)[0]).sum().item()
            / (circle | shape_mask("triangle", box_t, 32)[0]).sum().item()]
    expected = np.exp(fits[0] / 0.05) / sum(np.exp(f / 0.05) for f in fits)
    assert d.iou[0, 0] == 1 and d.confidence[0, 0].item() == pytest.approx(expected, rel=1e-5) and expected < 0.05


def test_same_colour_instances_are_matched_one_to_one():
    a, b = (0.0625, 0.0625, 0.3125, 0.3125), (0.5, 0.5, 0.8125, 0.8125)
    target = layout(("green circle", b), ("green circle", a))
    d = detect(render([layout(("green circle", a), ("green circle", b))]), [target])
    assert d.success[0].all()
    torch.testing.assert_close(d.boxes[0], torch.tensor([b, a]))
    # only one object drawn: exactly one instance can claim it
    d = detect(render([layout(("green circle", a))]), [target])
    assert d.success[0].tolist() == [False, True]


def test_reward_is_the_per_instance_mean_of_iou_plus_confidence():
    a, b = (0.0, 0.0, 0.25, 0.25), (0.5, 0.5, 0.75, 0.75)
    target = layout(("white square", a), ("black square", b))
    out = ShapesReward()(render([layout(("white square", a))]), [target])  # the black square is missing
    c = square_confidence(8)  # 0.25 of 32 px
    assert out.rewards.item() == pytest.approx((1 + c + 0 + 0) / 2)
    assert ShapesReward(normalize=False)(render([target]), [target]).rewards.item() == pytest.approx(2 * (1 + c))
    assert out.info["iou"].shape == (1, 2) and out.info["success"].tolist() == [[True, False]]


def test_phrases_outside_the_world_are_a_clear_error():
    with pytest.raises(LayoutError, match="not in the Shapes world"):
        ShapesReward()(torch.zeros(1, 3, 32, 32), [layout(("purple dog", (0.1, 0.1, 0.5, 0.5)))])


def test_reward_rejects_images_outside_the_contract():
    target = layout(("red square", (0.1, 0.1, 0.5, 0.5)))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ShapesReward()(torch.zeros(3, 32, 32), [target])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ShapesReward()(torch.full((1, 3, 32, 32), 255.0), [target])
    with pytest.raises(ValueError, match="1 images but 2 layouts"):
        ShapesReward()(torch.zeros(1, 3, 32, 32), [target, target])


def test_ddpo_signature_accepts_numpy_and_pil_and_matches_the_tensor_path():
    layouts = sample_layouts(3, [2, 3], seed=5)
    images = render(layouts)
    expected = ShapesReward()(images, layouts).rewards
    fn = ShapesReward().as_ddpo_fn()
    uint8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    metadata = [{"layout": l.to_dict()} for l in layouts]
    for batch in (uint8, [Image.fromarray(im) for im in uint8], images):
        rewards, info = fn(batch, [l.prompt for l in layouts], metadata)
        torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0)
        assert rewards.dtype == torch.float32 and "iou" in info


def test_isr_and_miou_per_level_by_hand():
    # image 0 (L2): one success (IoU .8), one colour failure (IoU .6 counts 0)
    # image 1 (L1): one shape failure (IoU .9 counts 0)
    success = torch.tensor([[True, False], [False, False]])
    iou = torch.tensor([[0.8, 0.6], [0.9, 0.0]])
    attr_ok = torch.tensor([[True, False], [False, False]])
    mask = torch.tensor([[True, True], [True, False]])
    m = instance_metrics(success, iou, attr_ok, mask, [2, 1])
    assert m["isr"] == pytest.approx(1 / 3) and m["miou"] == pytest.approx(0.8 / 3)
    assert m["per_level"]["L2"] == {"isr": 0.5, "miou": pytest.approx(0.4), "instances": 2}
    assert m["per_level"]["L1"] == {"isr": 0.0, "miou": 0.0, "instances": 1}
    assert list(m["per_level"]) == ["L1", "L2"]


def test_summary_counts_each_failure_at_the_first_check_it_fails():
    # four instances asked for, drawn: right (ok), absent (missed), 4 px off (IoU 1/3: wrong box),
    # a circle where a triangle was asked (in its box: wrong attribute); a second image, all right
    ok, absent, off, circle = (0.0, 0.0, 0.25, 0.25), (0.5, 0.0, 0.75, 0.25), (0.0, 0.5, 0.25, 0.75), (0.5, 0.5, 0.75, 0.75)
    target = layout(("red square", ok), ("blue square", absent), ("green square", off), ("white triangle", circle))
    drawn = layout(("red square", ok), ("green square", (0.125, 0.5, 0.375, 0.75)), ("white circle", circle))
    other = layout(("yellow circle", ok))
    layouts = [target, other]
    out = ShapesReward()(torch.cat([render([drawn]), render([other])]), layouts)
    m = summarize([out], layouts)
    assert m["verdicts"] == {"ok": 2, "missed": 1, "wrong box": 1, "wrong attribute": 1}
    assert m["isr"] == pytest.approx(2 / 5)


def test_the_loose_world_draws_larger_boxes_that_may_touch_and_the_classic_one_is_unchanged():
    from diffrl.shapes.world import CLASSIC, LOOSE, _apart

    def pairs(layouts):
        return [(a, b) for layout in layouts for i, a in enumerate(layout.boxes) for b in layout.boxes[i + 1:]]

    loose = sample_layouts(200, [2, 3, 4, 5, 6], seed=3, world="loose")
    sides = [min(b[2] - b[0], b[3] - b[1]) * GRID for layout in loose for b in layout.boxes]
    assert min(sides) >= LOOSE.min_side - 1e-6 > CLASSIC.min_side
    grid = [[tuple(round(v * GRID) for v in box) for box in pair] for pair in pairs(loose)]
    assert all(_apart(a, b, 0) for a, b in grid)  # never overlapping ...
    assert any(not _apart(a, b, 1) for a, b in grid)  # ... but some share an edge, which the classic gap never allows
    classic = sample_layouts(200, [2, 3, 4, 5, 6], seed=3)
    grid = [[tuple(round(v * GRID) for v in box) for box in pair] for pair in pairs(classic)]
    assert all(_apart(a, b, 1) for a, b in grid)
    # the default world is the classic one, draw for draw (the held-out set of shapes-tiny's numbers)
    assert [lay.boxes for lay in classic] == [lay.boxes for lay in sample_layouts(200, [2, 3, 4, 5, 6], seed=3,
                                                                                  world=CLASSIC)]


def test_loosen_and_mislabel_change_only_what_the_model_is_told():
    from diffrl.shapes.world import CONFUSABLE, loosen, mislabel

    layout = Layout("a red square", ["red square"], [(0.25, 0.25, 0.5, 0.75)])
    g = torch.Generator().manual_seed(0)
    (grown,) = loosen([layout], 0.2, g)
    x0, y0, x1, y1 = grown.boxes[0]
    m = (0.25 - x0) / 0.25  # the same m on every side, ≤ margin
    assert 0 <= m <= 0.2 and abs((0.25 - y0) / 0.5 - m) < 1e-6 and abs((x1 - 0.5) / 0.25 - m) < 1e-6
    (moved,) = loosen([layout], 0.0, g, shift=2)
    assert moved.boxes[0] == pytest.approx((0.25 + 2 / GRID, 0.25 + 2 / GRID, 0.5 + 2 / GRID, 0.75 + 2 / GRID))
    always = mislabel([layout] * 3, 1.0, g)
    assert all(list(lay.phrases) == [f"{CONFUSABLE['red']} square"] and lay.boxes == layout.boxes for lay in always)
    assert always[0].prompt == "a black square"
    assert list(mislabel([layout], 0.0, g)[0].phrases) == ["red square"]


def test_a_shapes_model_trains_and_is_judged_in_the_world_it_was_pre_trained_in(tmp_path):
    import json

    from diffrl.config import build_config
    from diffrl.envs.datasets import model_data

    assert build_config().env.data == "shapes-loose"  # the default base, shapes-mislabeled, is a loose-world model
    assert build_config({}, [("model.name", "shapes-tiny")]).env.data == "shapes"  # no world in its pretrain.json
    assert build_config({}, [("model.name", "shapes-tiny"), ("env.data", "shapes-loose")]).env.data == "shapes-loose"
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert model_data(str(folder)) == "shapes"  # a folder without pretrain.json: the classic world
    (folder / "pretrain.json").write_text(json.dumps({"config": {"world": "loose"}}))
    assert model_data(str(folder)) == "shapes-loose"
    assert model_data("not/a/model") == "shapes"  # the loader, not this default, says what is wrong with it
