"""The forward-process learners (AWM, DiffusionNFT) against hand-computed answers, and their runs."""

import json

import pytest
import torch
import yaml

from diffrl.algos.forward import awm_loss, group_times_noise, nft_loss, nft_reward, per_sample_mse
from diffrl.cli import main


def test_awm_loss_on_a_tiny_example():
    # two samples of one pixel each: errors (v − v*) of 1 and 2 → squared 1 and 4; advantages +1, −1
    velocity = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    target = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    advantages = torch.tensor([1.0, -1.0])
    assert awm_loss(velocity, target, advantages).item() == pytest.approx((1 * 1 + (-1) * 4) / 2)
    # per-sample means over C, H, W: [[0, 2], [2, 2]] errors → (0 + 4) / 2 = 2 and (4 + 4) / 2 = 4
    v = torch.tensor([[0.0, 2.0], [2.0, 2.0]]).view(2, 1, 1, 2)
    torch.testing.assert_close(per_sample_mse(v, torch.zeros_like(v)), torch.tensor([2.0, 4.0]))


def test_awm_generalised_huber_weighting_by_hand():
    # Flow-Factory's ghuber: w(ℓ, t) = t/p·((ℓ + ε)^p − ε^p); ℓ = 1 and 4 as above, t = 0.5 and 0.25, p = 1/4
    velocity = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    target = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    advantages, t = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.25])
    eps = 1e-10
    w = [0.5 / 0.25 * ((1 + eps) ** 0.25 - eps**0.25), 0.25 / 0.25 * ((4 + eps) ** 0.25 - eps**0.25)]
    assert awm_loss(velocity, target, advantages, t, power=0.25).item() == pytest.approx((w[0] - w[1]) / 2, rel=1e-5)
    # its gradient in v is A·t·(ℓ + ε)^(p−1)·2(v − v*) / 2 samples: sample 1 → 1·0.5·1·2·1 / 2 = 0.5
    v = velocity.clone().requires_grad_(True)
    awm_loss(v, target, advantages, t, power=0.25).backward()
    assert v.grad.flatten()[0].item() == pytest.approx(0.5, rel=1e-5)
    assert v.grad.flatten()[1].item() == pytest.approx(-1 * 0.25 * 4**-0.75 * 2 * 2 / 2, rel=1e-5)


def _tiny_model_batch(seed=0):
    """A linear 'velocity model' v_θ(x) = θ·x on 3 samples of one group, with their x0, x_t, t and targets."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor(0.3, requires_grad=True)
    x0 = torch.randn(3, 1, 2, 2, generator=g)
    noise = torch.randn(1, 1, 2, 2, generator=g).expand(3, -1, -1, -1)  # one ε for the group (CRN)
    t = torch.full((3,), 0.6)
    x_t = (1 - 0.6) * x0 + 0.6 * noise
    return theta, x0, noise, t, x_t, noise - x0


def test_equal_rewards_in_a_group_give_zero_gradient():
    theta, x0, noise, t, x_t, target = _tiny_model_batch()
    zero = torch.zeros(3)  # the group advantages of equal rewards
    awm_loss(theta * x_t, target, zero).backward()
    assert theta.grad.item() == 0.0
    theta.grad = None
    # NFT at v_θ = v_old and r = 1/2: the positive and negative branches pull equally and oppositely
    r = nft_reward(zero, adv_clip=5.0)
    torch.testing.assert_close(r, torch.full((3,), 0.5))
    old = (theta * x_t).detach()
    nft_loss(theta * x_t, old, x_t, x0, t, r, beta=1.0, adv_clip=5.0).backward()
    assert abs(theta.grad.item()) < 1e-6


def test_nft_loss_at_the_limits_of_beta_and_r():
    g = torch.Generator().manual_seed(1)
    v, v_old, x0 = (torch.randn(2, 1, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.5, 0.25])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * torch.randn(2, 1, 2, 2, generator=g)

    def weighted(vel):  # ‖x̂0(v) − x0‖² / mean|x̂0(v) − x0|, per sample, x̂0(v) = x_t − t·v
        err = x_t - t.view(-1, 1, 1, 1) * vel - x0
        return (err**2).flatten(1).mean(1) / err.abs().flatten(1).mean(1)

    ones, zeros = torch.ones(2), torch.zeros(2)
    # r = 1, β = 1: only the positive policy, v⁺ = v_θ → A_max · mean of the weighted error of v_θ
    got = nft_loss(v, v_old, x_t, x0, t, ones, beta=1.0, adv_clip=5.0)
    assert got.item() == pytest.approx(5.0 * weighted(v).mean().item(), rel=1e-5)
    # r = 0, β = 1: only the negative policy, v⁻ = 2·v_old − v_θ
    got = nft_loss(v, v_old, x_t, x0, t, zeros, beta=1.0, adv_clip=5.0)
    assert got.item() == pytest.approx(5.0 * weighted(2 * v_old - v).mean().item(), rel=1e-5)
    # β → 0: both branches collapse onto v_old, the loss to A_max/β times its weighted error
    got = nft_loss(v, v_old, x_t, x0, t, torch.tensor([0.3, 0.8]), beta=1e-4, adv_clip=1.0)
    assert (got * 1e-4).item() == pytest.approx(weighted(v_old).mean().item(), rel=1e-3)
    # r from advantages: A = ±A_max → 1 / 0, clipped beyond; A = 0 → 1/2
    torch.testing.assert_close(nft_reward(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0]), 5.0),
                               torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_nft_gradient_at_the_old_policy_is_awms_direction():
    """At v_θ = v_old the NFT gradient is Σ 2·(A/A_max)·t·(x̂0 − x0)/w: the sign of each sample's pull is that of its
    advantage, as in AWM."""
    theta, x0, noise, t, x_t, target = _tiny_model_batch(seed=3)
    advantages = torch.tensor([1.0, -0.5, -0.5])
    nft_loss(theta * x_t, (theta * x_t).detach(), x_t, x0, t, nft_reward(advantages, 5.0), 1.0, 5.0).backward()
    nft_grad, theta.grad = theta.grad.clone(), None
    # the same derivative by hand, sample by sample: d/dθ of A/A_max·‖err‖²/w·A_max with err = x_t − t·θ·x_t − x0
    err = x_t - t.view(-1, 1, 1, 1) * theta.detach() * x_t - x0
    w = err.abs().flatten(1).mean(1)
    by_hand = (advantages * (2 * err * (-t.view(-1, 1, 1, 1) * x_t)).flatten(1).mean(1) / w).mean()
    assert nft_grad.item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_samples_of_a_group_share_t_and_noise():
    layout_index = torch.tensor([0, 0, 0, 1, 1, 1])
    schedule = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.manual_seed(0)
    t, noise = group_times_noise(layout_index, 3, (2, 4, 4), schedule, crn=True)
    assert t.shape == (3, 6) and noise.shape == (3, 6, 2, 4, 4)
    for rows in ([0, 1, 2], [3, 4, 5]):
        assert (t[:, rows] == t[:, rows[:1]]).all() and (noise[:, rows] == noise[:, rows[:1]]).all()
    assert not torch.equal(noise[:, 0], noise[:, 3])
    assert all(len(set(t[:, i].tolist())) == 3 for i in range(6))  # K distinct schedule times per sample
    assert set(t.flatten().tolist()) <= set(schedule.tolist())
    t, noise = group_times_noise(layout_index, 2, (2, 4, 4), None, crn=False)
    assert not torch.equal(noise[:, 0], noise[:, 1]) and ((t > 0) & (t < 1)).all()


@pytest.mark.parametrize("algo", ["awm", "nft"])
def test_a_resumed_forward_run_matches_the_uninterrupted_run(tmp_path, saved_generator, algo):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 4},
                                      "eval": {"layouts": 4, "batch_size": 4, "grid": 4}, "checkpoint_every": 1,
                                      "model": {"text_cache": 0}, "forward": {"old_uprate": 0.3}}))
    common = ["--model", str(saved_generator), "--algo", algo, "--config", str(config), "--quiet"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", *common, "--iterations", "3", "--out", str(whole)]) == 0
    assert main(["train", *common, "--iterations", "2", "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--iterations", "3", "--quiet"]) == 0

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(part) == metrics(whole) and len(metrics(whole)) == 3
    assert metrics(whole)[0]["loss_policy"] != 0
    final = [json.loads((r / "summary.json").read_text())["final"] for r in (part, whole)]
    assert final[0] == final[1]


def test_forward_learners_refuse_a_group_of_one(capsys):
    assert main(["train", "--algo", "nft", "env.group_size=1"]) == 2
    assert "needs ≥ 2" in capsys.readouterr().err
