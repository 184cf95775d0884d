"""I-DRUID's L_ldm beside RL (joint.ldm_coef) and alone (--algo sft), on paired renders of the Shapes world."""

import copy
import json

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.grpo import GRPO
from diffrl.algos.sft import flow_matching_loss
from diffrl.algos.sft_learner import SFT
from diffrl.algos.replica import frozen_copy
from diffrl.algos.trainer import paired_renders
from diffrl.cli import main
from diffrl.config import AlgoConfig, JointConfig
from diffrl.policies.actor import SDEPolicyNet
from diffrl.shapes.world import render
from tests.test_env_and_actor import make


def _rollout(generator, learner_cls, ldm_coef=0.0, **cfg):
    env, policy, actor, store = make(generator)
    learner = learner_cls(policy, SDEPolicyNet(frozen_copy(generator), store, 0.7, 2), actor,
                          AlgoConfig(minibatch_size=1000, **cfg), joint=JointConfig(ldm_coef=ldm_coef))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    return learner, rollout, store


def _fixed_loss(generator, paired) -> float:
    with torch.no_grad():
        return float(flow_matching_loss(generator, paired.latents, paired.cond, torch.Generator().manual_seed(7)))


def test_paired_renders_are_the_iterations_layouts_drawn_by_the_world(tiny_generator):
    _, _, store = _rollout(tiny_generator, GRPO)
    paired = paired_renders(tiny_generator, store)
    assert paired.latents.shape == (2, 3, 32, 32) and len(paired.cond) == 2  # one row per layout, not per sample
    torch.testing.assert_close(paired.latents, render(store.layouts) * 2 - 1)
    assert torch.equal(paired.cond.boxes, store.conditioning.boxes)


def test_sft_lowers_the_flow_matching_loss_on_its_pairs(tiny_generator):
    generator = copy.deepcopy(tiny_generator)
    learner, rollout, store = _rollout(generator, SFT, lr=3e-3, epochs=15)
    paired = paired_renders(generator, store)
    before = _fixed_loss(generator, paired)
    logs = learner.update(rollout, paired)
    after = _fixed_loss(generator, paired)
    assert after < 0.8 * before, (before, after)
    assert set(logs) == {"loss_ldm", "grad_norm"}


def test_joint_loss_adds_ldm_coef_times_l_ldm_and_logs_it(tiny_generator):
    generator = copy.deepcopy(tiny_generator)
    learner, rollout, store = _rollout(generator, GRPO, lr=0.0, ldm_coef=0.5)
    paired = paired_renders(generator, store)
    torch.manual_seed(3)
    got = learner.ldm_loss(paired)
    torch.manual_seed(3)
    expected = 0.5 * flow_matching_loss(generator, paired.latents, paired.cond)
    torch.testing.assert_close(got, expected)
    assert "loss_ldm" in learner.update(rollout, paired)
    off, rollout, _ = _rollout(generator, GRPO, lr=0.0)  # ldm_coef 0: the RL loss alone
    assert off.ldm_loss(paired) is None and "loss_ldm" not in off.update(rollout, paired)


def test_sft_runs_through_the_cli_and_needs_paired_data(tmp_path, saved_generator, capsys):
    run = tmp_path / "sft"
    code = main(["train", "--model", str(saved_generator), "--algo", "sft", "--iterations", "1", "--out", str(run),
                 "--quiet", "env.layouts_per_iter=2", "env.num_steps=3", "eval.layouts=5", "eval.grid=2"])
    assert code == 0
    (line,) = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["loss_ldm"] > 0 and "loss_objective" not in line
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text(json.dumps({"prompt": "a red square", "phrases": ["red square"], "boxes": [[0.1, 0.1, 0.5, 0.5]]}) + "\n")
    capsys.readouterr()
    assert main(["train", "--algo", "grpo", "--data", str(layouts), "joint.ldm_coef=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need paired images" in err[0], err
    assert not (tmp_path / "x").exists()


def test_sft_trains_in_its_models_loose_world_and_its_export_keeps_the_world(tmp_path, saved_generator):
    """With no --data, a model pre-trained in the loose world (its pretrain.json) trains SFT on that world's paired
    renders, and `diffrl export` carries the record, so the exported folder's default data is the same world."""
    import shutil

    from diffrl.envs.datasets import model_data

    model = tmp_path / "loose-model"
    shutil.copytree(saved_generator, model)
    (model / "pretrain.json").write_text(json.dumps({"config": {"world": "loose"}, "log": []}) + "\n")
    run = tmp_path / "sft"
    assert main(["train", "--model", str(model), "--algo", "sft", "--iterations", "1", "--out", str(run), "--quiet",
                 "env.layouts_per_iter=2", "env.num_steps=3", "eval.layouts=5", "eval.grid=2"]) == 0
    assert "data: shapes-loose" in (run / "config.yaml").read_text()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss_ldm"] > 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert model_data(str(out)) == "shapes-loose" and model_data(str(saved_generator)) == "shapes"
