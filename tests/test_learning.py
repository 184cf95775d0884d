"""The learners move the policy in the direction of the reward: GRPO on the shipped model raises a
reward the early (RL-window) denoising steps control — the mean brightness of the image."""

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.grpo import GRPO
from diffrl.algos.replica import frozen_copy
from diffrl.config import AlgoConfig
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import load_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards import Reward, RewardOutput


class Brightness(Reward):
    def __call__(self, images, layouts):
        return RewardOutput(images.mean(dim=(1, 2, 3)))  # [B] in [0, 1]


def test_grpo_raises_a_reward_the_window_steps_control():
    torch.manual_seed(0)
    generator = load_generator("shapes-tiny")
    store = ConditionStore()
    env = LayoutEnv(generator, Brightness(), ShapesLayouts([3], seed=0), store,
                    layouts_per_reset=8, group_size=4, num_steps=10, seed=0)
    policy = SDEPolicyNet(generator, store, noise_level=0.7, window_steps=2)
    reference = SDEPolicyNet(frozen_copy(generator), store, 0.7, 2)
    actor = make_actor(policy, env.action_spec)
    learner = GRPO(policy, reference, actor, AlgoConfig(lr=3e-4, kl_coef=0.01))
    rewards = []
    for _ in range(12):
        with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
            rollout = env.rollout(10, actor, auto_reset=True)
        rewards.append(float(rollout["next", "reward"][:, -1].mean()))
        learner.update(rollout)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, rewards
