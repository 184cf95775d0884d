"""Weighted rewards: the sum and its logged parts, the --reward spec and its one-line errors, the CLI."""

import pytest
import torch

from diffrl.cli import main
from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.registry import UnknownNameError
from diffrl.rewards import CompositeReward, CycleConsistencyReward, ShapesReward, build_reward, parse_reward_spec
from diffrl.rewards.grounder import ShapesGrounder
from diffrl.shapes.world import render
from tests.test_shapes import square_confidence

TARGET = Layout("a red square", ["red square"], [(0.25, 0.25, 0.5, 0.5)])
SHIFTED = Layout("a red square", ["red square"], [(0.375, 0.25, 0.625, 0.5)])  # 4 px to the right


def test_composite_is_the_weighted_sum_with_each_part_logged():
    # The drawn square overlaps its box by 4×8 of 8×8 px: IoU 32/96 = 1/3, a clean 8-px square (confidence c)
    # → shapes 1 + 1/3; cycle (l1): x0 and x1 off by 0.125 → −0.0625.
    images, layouts = render([TARGET, SHIFTED]), [TARGET, TARGET]
    reward = build_reward("shapes=1,cycle=0.5", model="shapes")
    assert isinstance(reward, CompositeReward) and isinstance(reward.parts["cycle"][0].grounder, ShapesGrounder)
    out = reward(images, layouts)
    c = square_confidence(8)
    torch.testing.assert_close(out.info["part/shapes"], torch.tensor([1 + c, 1 / 3 + c]))
    torch.testing.assert_close(out.info["part/cycle"], torch.tensor([0.0, -0.0625]))
    torch.testing.assert_close(out.rewards, torch.tensor([1 + c, 1 / 3 + c - 0.5 * 0.0625]))
    torch.testing.assert_close(out.info["shapes/iou"], torch.tensor([[1.0], [1 / 3]]))
    torch.testing.assert_close(out.info["cycle/distance"], torch.tensor([[0.0], [0.0625]]))
    # the first part's verdicts, unprefixed, for the trainer's train ISR and the evaluator
    assert torch.equal(out.info["success"], out.info["shapes/success"]) and "color_ok" in out.info


def test_composite_of_rewards_built_by_hand():
    reward = CompositeReward({"exact": (ShapesReward(normalize=False), 2.0),
                              "cycle": (CycleConsistencyReward(grounder="shapes"), 1.0)})
    out = reward(render([SHIFTED]), [TARGET])
    torch.testing.assert_close(out.rewards, torch.tensor([2 * (1 / 3 + square_confidence(8)) - 0.0625]))


def test_spec_parsing():
    assert parse_reward_spec("gdino") == [("gdino", 1.0)]
    assert parse_reward_spec(" gdino = 1 , cycle=0.5") == [("gdino", 1.0), ("cycle", 0.5)]
    assert parse_reward_spec("shapes=-1e-1") == [("shapes", -0.1)]
    assert isinstance(build_reward("shapes"), ShapesReward)  # a bare name is the reward itself, info unprefixed
    assert isinstance(build_reward("cycle", model="shapes").grounder, ShapesGrounder)
    both = build_reward("gdino=1,cycle=0.5", model="shapes")  # one detector for the parts that need one
    assert both.parts["gdino"][0].grounder is both.parts["cycle"][0].grounder


@pytest.mark.parametrize("spec, message", [
    ("gdino=1,cycle=x", "part 'cycle=x' must be name=weight, the weight a number; e.g. --reward gdino"),
    ("gdino=", "part 'gdino=' must be name=weight"),
    ("=1", "part '=1' must be name=weight"),
    ("gdino=1,,cycle=1", "part '' must be name=weight"),
    ("gdino,cycle", "part 'gdino' must be name=weight"),
    ("gdino=nan", "part 'gdino=nan' must be name=weight"),
    ("gdino=1,gdino=2", "gdino appears twice"),
])
def test_malformed_specs_are_one_line_with_an_example(spec, message):
    with pytest.raises(UserError) as err:
        parse_reward_spec(spec)
    assert message in str(err.value) and "\n" not in str(err.value) and "e.g." in str(err.value)


@pytest.mark.parametrize("spec", ["nope", "gdino=1,nope=0.5"])
def test_unknown_part_is_the_registry_error_listing_valid_names(spec):
    with pytest.raises(UnknownNameError, match=r"^unknown reward 'nope' for --reward; valid: cycle, gdino, http, shapes$"):
        parse_reward_spec(spec)


def test_reward_model_needs_a_reward_with_a_detector():
    with pytest.raises(UserError, match=r"--reward-model is for rewards with a detector \(cycle, gdino\)"):
        build_reward("shapes", model="some/detector")


def test_cli_rejects_a_bad_spec_in_one_line_before_any_work(tmp_path, capsys):
    assert main(["train", "--reward", "gdino=1,cycle=half", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part 'cycle=half'" in err[0] and not (tmp_path / "run").exists()


@pytest.mark.usefixtures("one_thread")
def test_cli_eval_accepts_a_weighted_spec(saved_generator, capsys):
    assert main(["eval", "--model", str(saved_generator), "--layouts", "4", "--levels", "2", "--steps", "2", "--quiet",
                 "--reward", "shapes=1,cycle=0.5", "--reward-model", "shapes"]) == 0
    out = capsys.readouterr().out
    assert "L2" in out and "reward" in out
