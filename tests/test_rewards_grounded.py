"""The grounded rewards' arithmetic against hand-computed answers: a stub grounder with fixed detections
for I-DRUID's IoU + confidence and EchoGen's cycle consistency, and the exact Shapes grounder."""

import pytest
import torch

from diffrl.layout import Layout
from diffrl.rewards import CycleConsistencyReward, GroundingDinoReward, ShapesReward
from diffrl.boxes import box_iou, generalized_box_iou, l1_distance
from diffrl.rewards.grounder import Grounder, Grounding
from diffrl.shapes.world import render, sample_layouts


class Fixed(Grounder):
    """Per image, fixed detections {phrase: [(box, score), ...]}; phrases it was not given found nothing."""

    def __init__(self, *per_image):
        self.per_image = per_image

    def __call__(self, images, phrases):
        assert len(phrases) == images.shape[0] == len(self.per_image)
        return [{p: Grounding(torch.tensor([b for b, _ in found.get(p, [])]).reshape(-1, 4),
                              torch.tensor([s for _, s in found.get(p, [])]).reshape(-1))
                 for p in image_phrases} for found, image_phrases in zip(self.per_image, phrases)]


def layout(*instances):
    return Layout("a picture", [p for p, _ in instances], [b for _, b in instances])


def blank(n):
    return torch.full((n, 3, 8, 8), 0.5)


def test_box_geometry_by_hand():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.75, 0.75, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[0.0625 / 0.4375, 0.0, 1.0]]))
    # disjoint: IoU 0, enclosing box the whole image (area 1), union 0.25 + 0.0625 → GIoU = −(1 − 0.3125)
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[0.0625 / 0.4375 - (0.5625 - 0.4375) / 0.5625,
                                                                          -0.6875, 1.0]]))
    torch.testing.assert_close(l1_distance(a, b), torch.tensor([[0.25, 0.625, 0.0]]))


RED_1, RED_2, BLUE = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0), (0.0, 0.5, 0.5, 1.0)
TWO_REDS_AND_A_BLUE = layout(("red square", RED_1), ("red square", RED_2), ("blue circle", BLUE))


def test_gdino_reward_by_hand_one_to_one_within_a_phrase():
    # Both red instances overlap D best (IoU 1/7 each), but D can go to one only: the matching gives RED_1 the
    # small box E (IoU 0.01/0.25 = 0.04) and RED_2 the box D, the largest total IoU (0.04 + 1/7 > 1/7 + 0).
    # The blue detection sits exactly on RED_1 but belongs to "blue circle": found, IoU 0 with BLUE, confidence 0.7.
    # The green triangle of the second image found nothing: IoU 0, confidence 0.
    D, E = (0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 0.1, 0.1)
    grounder = Fixed({"red square": [(D, 0.9), (E, 0.5)], "blue circle": [(RED_1, 0.7)]}, {})
    layouts = [TWO_REDS_AND_A_BLUE, layout(("green triangle", (0.2, 0.2, 0.6, 0.6)))]
    out = GroundingDinoReward(grounder=grounder)(blank(2), layouts)
    torch.testing.assert_close(out.info["iou"], torch.tensor([[0.04, 1 / 7, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.info["confidence"], torch.tensor([[0.5, 0.9, 0.7], [0.0, 0.0, 0.0]]))
    assert out.info["found"].tolist() == [[True, True, True], [False, False, False]]
    assert out.info["instance_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert not out.info["success"].any()  # no IoU reaches 0.5
    torch.testing.assert_close(out.rewards, torch.tensor([(0.54 + 1 / 7 + 0.9 + 0.7) / 3, 0.0]))
    total = GroundingDinoReward(grounder=grounder, normalize=False)(blank(2), layouts).rewards
    torch.testing.assert_close(total, torch.tensor([0.54 + 1 / 7 + 0.9 + 0.7, 0.0]))


def test_gdino_confidence_breaks_ties_between_detections_that_miss():
    far_a, far_b = (0.6, 0.0, 0.7, 0.1), (0.8, 0.0, 0.9, 0.1)  # both IoU 0 with RED_1
    out = GroundingDinoReward(grounder=Fixed({"red square": [(far_a, 0.3), (far_b, 0.8)]}))(
        blank(1), [layout(("red square", RED_1))])
    torch.testing.assert_close(out.info["boxes"][0, 0], torch.tensor(far_b))
    torch.testing.assert_close(out.rewards, torch.tensor([0.8]))


def test_gdino_with_the_shapes_grounder_is_the_exact_shapes_reward():
    # With one instance per colour, matching per phrase (gdino) and per colour (the exact detector) agree.
    layouts = [l for l in sample_layouts(40, [1, 2, 3, 4], seed=5) if len({p.split()[0] for p in l.phrases}) == l.n]
    drawn = [Layout(l.prompt, l.phrases, [(x0, y0, (x0 + x1) / 2, y1) for x0, y0, x1, y1 in l.boxes]) for l in layouts]
    images = torch.cat([render(layouts[:4]), render(drawn[4:])])  # exact, and half-width objects
    ours = GroundingDinoReward(grounder="shapes")(images, layouts)
    exact = ShapesReward()(images, layouts)
    assert len(layouts) >= 8
    torch.testing.assert_close(ours.rewards, exact.rewards)
    for key in ("iou", "confidence", "instance_mask"):
        assert torch.equal(ours.info[key], exact.info[key]), key


RECOVERED = {"red square": [((0.5, 0.5, 1.0, 0.9), 0.9), ((0.1, 0.0, 0.5, 0.5), 0.4)],
             "blue circle": [(RED_1, 0.8)]}  # exactly on RED_1, but another phrase: it may not match RED_1
FOUR = layout(("red square", RED_1), ("red square", RED_2), ("blue circle", BLUE), ("green triangle", (0.6, 0, 1, 0.4)))


@pytest.mark.parametrize("distance, per_instance", [
    # l1: |0 − 0.1| / 4, |1 − 0.9| / 4, (0.5 + 0.5) / 4, nothing recovered → 1
    ("l1", [0.025, 0.025, 0.25, 1.0]),
    # giou: both red pairs nest (IoU 0.2 / 0.25, enclosing = union) → 1 − 0.8; BLUE and RED_1 only touch,
    # union = enclosing = 0.5 → GIoU 0 → 1; nothing recovered → 2
    ("giou", [0.2, 0.2, 1.0, 2.0]),
])
def test_cycle_reward_by_hand(distance, per_instance):
    out = CycleConsistencyReward(distance=distance, grounder=Fixed(RECOVERED))(blank(1), [FOUR])
    torch.testing.assert_close(out.info["distance"], torch.tensor([per_instance]))
    torch.testing.assert_close(out.rewards, torch.tensor([-sum(per_instance) / 4]))
    matched = torch.tensor([(0.1, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 0.9), RED_1])  # blue's box is RED_1's, not RED_1's match
    torch.testing.assert_close(out.info["boxes"][0, :3], matched)
    assert out.info["found"].tolist() == [[True, True, True, False]]


def test_cycle_matches_one_to_one_and_an_unrecovered_instance_costs_the_maximum():
    # One red box recovered, close to RED_2: RED_2 takes it (l1 0.025), RED_1 is left unrecovered (1).
    out = CycleConsistencyReward(grounder=Fixed({"red square": [((0.5, 0.5, 1.0, 0.9), 0.9)]}))(
        blank(1), [layout(("red square", RED_1), ("red square", RED_2))])
    torch.testing.assert_close(out.info["distance"], torch.tensor([[1.0, 0.025]]))
    torch.testing.assert_close(out.rewards, torch.tensor([-(1.0 + 0.025) / 2]))


def test_cycle_with_the_shapes_grounder_on_rendered_images():
    target = layout(("red square", (0.25, 0.25, 0.5, 0.5)), ("blue square", (0.625, 0.625, 0.875, 0.875)))
    shifted = layout(("red square", (0.375, 0.25, 0.625, 0.5)), ("blue square", (0.625, 0.625, 0.875, 0.875)))
    out = CycleConsistencyReward(grounder="shapes")(render([target, shifted]), [target, target])
    # exact render: 0; red moved right by 4 px = 0.125 on x0 and x1 → l1 0.0625, the blue one exact
    torch.testing.assert_close(out.rewards, torch.tensor([0.0, -0.0625 / 2]))


def test_unknown_cycle_distance_is_a_one_line_user_error():
    from diffrl.errors import UserError

    with pytest.raises(UserError, match="unknown cycle distance 'l2'; valid: l1, giou"):
        CycleConsistencyReward(distance="l2", grounder="shapes")
