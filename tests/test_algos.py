"""Learner math against hand-computed answers: GRPO group advantages, I-DRUID's critic advantage and loss."""

import copy

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.advantages import critic_advantages, group_advantages, normalize
from diffrl.algos.ppo import PPO
from diffrl.algos.replica import frozen_copy
from diffrl.config import AlgoConfig, PGConfig, PPOConfig
from diffrl.policies.actor import SDEPolicyNet
from tests.test_env_and_actor import make


def test_group_advantages_on_a_known_group():
    # group 0: rewards 1, 3 → mean 2, population std 1 → −1, +1
    # group 1: rewards 2, 2, 5 → mean 3, std sqrt((1 + 1 + 4) / 3) = sqrt(2) → −1/√2, −1/√2, 2/√2
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.0, 5.0])
    groups = torch.tensor([0, 1, 0, 1, 1])
    got = group_advantages(rewards, groups, eps=0.0)
    s = 2**0.5
    torch.testing.assert_close(got, torch.tensor([-1.0, -1 / s, 1.0, -1 / s, 2 / s]))


def test_batch_scaled_group_advantages_on_a_known_batch():
    # centred on each group's mean as above: −1, −1, +1, −1, +2; their batch std is sqrt((1+1+1+1+4)/5) = sqrt(1.6)
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.0, 5.0])
    groups = torch.tensor([0, 1, 0, 1, 1])
    got = group_advantages(rewards, groups, eps=0.0, scale="batch")
    torch.testing.assert_close(got, torch.tensor([-1.0, -1.0, 1.0, -1.0, 2.0]) / 1.6**0.5)


def test_batch_scale_keeps_a_near_tie_small_where_group_scale_blows_it_up():
    rewards = torch.tensor([0.70, 0.71, 0.2, 1.2])  # group 0 nearly tied, group 1 far apart
    groups = torch.tensor([0, 0, 1, 1])
    by_group = group_advantages(rewards, groups, scale="group")
    by_batch = group_advantages(rewards, groups, scale="batch")
    torch.testing.assert_close(by_group[:2].abs(), torch.ones(2), atol=0.02, rtol=0)  # ±1 for a 0.01 difference
    assert by_batch[:2].abs().max() < 0.03 and by_batch[3] > 1.0


def test_a_group_of_equal_rewards_has_zero_advantage():
    got = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.1, 0.3]), torch.tensor([4, 4, 4, 9, 9]))
    assert torch.equal(got[:3], torch.zeros(3))
    assert got[3] < 0 < got[4]


def test_critic_advantage_and_batch_normalisation():
    torch.testing.assert_close(critic_advantages(torch.tensor([1.0, 0.5]), torch.tensor([0.25, 1.0])),
                               torch.tensor([0.75, -0.5]))
    a = normalize(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, sample std 1
    torch.testing.assert_close(a, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0)


def _ppo(generator, critic_lr=1e-3, critic_coef=1.0, **cfg):
    env, policy, actor, store = make(generator)
    reference = SDEPolicyNet(frozen_copy(generator), store, 0.7, 2)
    return env, PPO(policy, reference, actor, AlgoConfig(minibatch_size=1000, **cfg),
                    ppo=PPOConfig(critic_lr=critic_lr, critic_coef=critic_coef))


def test_ppo_advantage_is_reward_minus_critic_and_critic_loss_is_squared_error(tiny_generator):
    env, learner = _ppo(tiny_generator, lr=0.0, critic_lr=0.0, critic_coef=1.0)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, learner.loss.actor_network, auto_reset=True)
    flat = learner.window_batch(rollout).reshape(-1)  # [B·W]
    with torch.no_grad():
        values = learner.critic(flat.select(*learner.critic.in_keys).clone())["state_value"].squeeze(-1)
        rewards = flat["reward"]
        torch.testing.assert_close(learner.advantages(flat, rewards), normalize(rewards - values))
        expected_critic_loss = ((values - rewards) ** 2).mean()
    logs = learner.update(rollout)  # lr 0: nothing moves, so every minibatch sees the same critic
    assert logs["loss_critic"] == pytest.approx(expected_critic_loss.item(), rel=1e-5)
    assert logs["mean_ratio"] == 1.0 and logs["kl_ref"] == 0.0


def test_ppo_update_trains_the_critic_toward_the_rewards(tiny_generator):
    generator = copy.deepcopy(tiny_generator)
    env, learner = _ppo(generator, lr=0.0, critic_lr=1e-2, epochs=20)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, learner.loss.actor_network, auto_reset=True)
    first = learner.update(rollout)["loss_critic"]
    second = learner.update(rollout)["loss_critic"]
    assert second < first / 2
    assert learner.trainable_modules().keys() == {"denoiser", "critic"}


def test_anchor_is_zero_for_the_reference_and_grows_once_the_policy_moves(tiny_generator):
    from diffrl.algos.grpo import GRPO

    generator = copy.deepcopy(tiny_generator)
    for fuser in generator.denoiser.adapter.fusers:  # open the gates so the adapter matters
        fuser.gate_attn.data.fill_(0.5)
    env, policy, actor, store = make(generator)
    reference = SDEPolicyNet(frozen_copy(generator), store, 0.7, 2)
    learner = GRPO(policy, reference, actor, AlgoConfig(lr=1e-3, minibatch_size=1000), pg=PGConfig(anchor_steps=3))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    with torch.no_grad():
        assert learner.anchor_loss(rollout).item() == 0.0  # steps 2..4 of an unchanged policy
    logs = learner.update(rollout)
    assert "loss_anchor" in logs
    with torch.no_grad():
        assert learner.anchor_loss(rollout).item() > 0.0
