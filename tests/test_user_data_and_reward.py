"""A user's own layouts and own reward: evaluated on what they train on (eval.data, a held-out part of --data),
and a reward class from outside diffrl (--reward module:Class, reward.options) that gives per-image scores only."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffrl.cli import main
from diffrl.config import build_config, parse_override
from diffrl.errors import UserError
from diffrl.eval.data import eval_data
from diffrl.eval.evaluate import held_out_layouts
from diffrl.eval.metrics import summarize
from diffrl.layout import read_jsonl, write_jsonl
from diffrl.rewards import RewardOutput, build_reward
from diffrl.shapes.world import sample_layouts

REPO = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "1", "env.layouts_per_iter=2", "env.group_size=2", "env.num_steps=3", "eval.batch_size=8",
        "eval.grid=4", "--quiet"]


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "A.jsonl", tmp_path / "B.jsonl"
    write_jsonl(a, sample_layouts(20, [2, 3], seed=1))  # levels 2-3: trained on
    write_jsonl(b, sample_layouts(5, [5], seed=2))  # level 5 only: what the evaluation must be on
    return a, b


def test_train_on_a_reports_base_and_final_on_b(tmp_path, files, capsys, one_thread):
    a, b = files
    run = tmp_path / "run"
    assert main(["train", "--data", str(a), f"eval.data={b}", "--out", str(run), *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_layouts"] == 5 and summary["held_out"] == 0
    assert summary["eval_data"] == f"5 layouts of {b}" and summary["judge"] == "reward shapes"
    for block in ("base", "final"):  # B's layouts alone: level 5, 5 × 5 instances
        assert summary[block]["per_level"] == {"L5": pytest.approx(summary[block]["per_level"]["L5"])}
        assert summary[block]["per_level"]["L5"]["instances"] == 25
    out = capsys.readouterr().out
    assert f"evaluated on 5 layouts of {b}, judged by the reward shapes" in out
    # diffrl eval on the run: the same layouts by the same code path, the same final numbers
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--steps", "3", "--out", str(report), "--quiet"]) == 0
    assert f"evaluating on 5 layouts of {b}" in capsys.readouterr().err
    assert json.loads(report.read_text())["isr"] == summary["final"]["isr"]


def test_train_on_a_alone_holds_out_part_of_a_and_says_how_many(tmp_path, files, capsys, one_thread):
    a, _ = files
    run = tmp_path / "run"
    assert main(["train", "--data", str(a), "--out", str(run), "eval.holdout=0.15", *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["held_out"] == 3 and summary["eval_layouts"] == 3  # round(0.15 · 20)
    err = capsys.readouterr().err
    assert f"3 layouts of {a} held out of training (17 train)" in err


def test_the_held_out_part_is_deterministic_and_never_trained_on(files):
    a, _ = files
    cfg = build_config({}, [("env.data", str(a)), ("eval.layouts", 4)])
    first, again = eval_data(cfg), eval_data(cfg)
    assert first.layouts == again.layouts and first.held_out == 2  # round(0.1 · 20), at most eval.layouts
    assert len(first.train_layouts) == 18 and not set(first.layouts) & set(first.train_layouts)
    assert sorted(map(repr, first.layouts + first.train_layouts)) == sorted(map(repr, read_jsonl(a)))
    capped = eval_data(build_config({}, [("env.data", str(a)), ("eval.layouts", 1)]))
    assert capped.held_out == 1
    one = a.parent / "one.jsonl"
    write_jsonl(one, read_jsonl(a)[:1])
    with pytest.raises(UserError, match="too few to hold any out"):
        eval_data(build_config({}, [("env.data", str(one))]))


def test_the_default_shapes_run_evaluates_on_the_same_held_out_set_as_before():
    cfg = build_config()  # the default base is a loose-world model: its world's held-out set
    evaluation = eval_data(cfg)
    assert evaluation.layouts == held_out_layouts(cfg.eval.layouts, cfg.eval.levels, cfg.eval.seed, "loose")
    assert evaluation.train_layouts is None and evaluation.held_out == 0
    assert evaluation.layouts == sample_layouts(250, [2, 3, 4, 5, 6], seed=1234, balanced=True, world="loose")
    classic = eval_data(build_config({}, [("model.name", "shapes-tiny")]))  # the hard benchmark's set is unchanged
    assert classic.layouts == sample_layouts(250, [2, 3, 4, 5, 6], seed=1234, balanced=True)


def test_reward_options_accept_any_key_from_yaml_and_the_command_line():
    cfg = build_config({"reward": {"options": {"distance": "giou"}}},
                       [parse_override("reward.options.scale=2"),
                        parse_override("reward.options.cycle.normalize=false")])
    assert cfg.reward.options == {"distance": "giou", "scale": 2, "cycle": {"normalize": False}}
    with pytest.raises(UserError, match="expected a mapping"):
        build_config({}, [parse_override("reward.options=3")])
    with pytest.raises(UserError, match="unknown config key 'reward.optoins.x'"):
        build_config({}, [parse_override("reward.optoins.x=1")])


def test_reward_options_reach_the_constructor_and_bad_ones_are_one_line():
    assert build_reward("shapes", None, {"normalize": False}).normalize is False
    parts = build_reward("shapes=1,cycle=0.5", "shapes", {"cycle": {"distance": "giou"}}).parts
    assert parts["cycle"][0].max_distance == 2.0  # giou's
    with pytest.raises(UserError, match=r"reward.options for shapes: .*'scale'.*takes normalize"):
        build_reward("shapes", None, {"scale": 2})
    with pytest.raises(UserError, match="not a part of"):
        build_reward("shapes=1,cycle=0.5", "shapes", {"distance": "giou"})


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:Reward", "cannot import no_such_module_xyz"),
    ("diffrl.rewards:Nope", "module diffrl.rewards has no 'Nope'"),
    ("diffrl.layout:Layout", "is not a subclass of diffrl.rewards.Reward"),
])
def test_a_reward_spec_that_cannot_load_is_one_line(spec, message, capsys):
    assert main(["train", "--reward", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_reward_announced_as_an_entry_point_is_found_by_name(monkeypatch):
    from importlib.metadata import EntryPoint

    import diffrl.rewards.compose as compose

    point = EntryPoint(name="exact", value="diffrl.rewards.shapes:ShapesReward", group="diffrl.rewards")
    monkeypatch.setattr(compose, "entry_points", lambda group: [point] if group == "diffrl.rewards" else [])
    assert compose.parse_reward_spec("exact=1,cycle=0.5") == [("exact", 1.0), ("cycle", 0.5)]
    assert type(build_reward("exact", None, {"normalize": False})).__name__ == "ShapesReward"
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        build_reward("nope")


def test_metrics_fall_back_to_the_reward_alone_and_say_so():
    layouts = sample_layouts(3, [2, 4], seed=0)
    block = summarize([RewardOutput(torch.tensor([1.0, 2.0, 4.0]))], layouts)
    assert block["isr"] is None and block["miou"] is None and block["verdicts"] is None
    assert block["reward"] == pytest.approx(7 / 3) and "per-image scores only" in block["note"]
    assert block["per_level"] == {"L2": {"reward": 2.5, "layouts": 2}, "L4": {"reward": 2.0, "layouts": 1}}


MY_REWARD = '''
    import torch
    from diffrl.rewards import Reward, RewardOutput

    class MyReward(Reward):
        """Brightness, times a scale: per-image scores and nothing else."""

        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def __call__(self, images, layouts):
            return RewardOutput(self.scale * (1 + images.mean(dim=(1, 2, 3))))
'''


def test_a_reward_from_a_folder_outside_diffrl_trains_with_its_options(tmp_path):
    (tmp_path / "mymodule.py").write_text(textwrap.dedent(MY_REWARD))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "diffrl.cli", "train", "--reward", "mymodule:MyReward", "reward.options.scale=2",
         "--out", str(run), "--iterations", "2", "env.layouts_per_iter=2", "env.group_size=2", "env.num_steps=3",
         "eval.layouts=4", "eval.levels=[2]", "eval.grid=4", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    for block in (summary["base"], summary["final"]):
        assert block["isr"] is None and 2 <= block["reward"] <= 4  # scale 2 reached the constructor
    assert summary["judge"] == "reward mymodule:MyReward"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(2 <= line["reward_mean"] <= 4 and "train_isr" not in line for line in lines)
    assert "per-image scores only" in result.stdout


@pytest.mark.usefixtures("one_thread")
def test_eval_takes_reward_options_as_train_does(saved_generator, monkeypatch, capsys):
    import diffrl.rewards

    seen = []

    def spy(spec, model=None, options=None, *rest):
        seen.append(dict(options or {}))
        return build_reward(spec, model, options, *rest)

    monkeypatch.setattr(diffrl.rewards, "build_reward", spy)
    assert main(["eval", "--model", str(saved_generator), "--layouts", "2", "--levels", "2", "--steps", "2",
                 "--leakage", "0", "--quiet", "reward.options.normalize=false"]) == 0
    assert seen == [{"normalize": False}]  # parsed as YAML, like train's section.key=value
    capsys.readouterr()
    assert main(["eval", "--model", str(saved_generator), "reward.options.scale=2"]) == 2  # the constructor's check
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward.options for shapes" in err[0] and "'scale'" in err[0], err
    assert main(["eval", "--model", str(saved_generator), "algo.lr=1"]) == 2  # eval has no training config
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algo.lr" in err[0] and "reward.options" in err[0], err
