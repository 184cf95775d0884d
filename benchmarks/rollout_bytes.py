"""Bytes a Ray rollout worker sends back per iteration: the whole [B, T] rollout (PPO, GRPO) against the last
step only (AWM, NFT: `diffrl.distributed.ray_workers.final_step`).

    python benchmarks/rollout_bytes.py [--model shapes-tiny] [--layouts 64] [--group 4] [--steps 10]

Rolls out 2 layouts × ``--group`` samples of the model through the same env and actor a worker uses, measures the
tensors of both forms per sample, and scales them to ``--layouts`` × ``--group`` samples (what one iteration of
`diffrl train` sends, whatever the number of workers). The reward's images never travel back with either form.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.distributed.ray_workers import final_step
from diffrl.envs.datasets import make_source
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import load_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards.shapes import ShapesReward


def nbytes(td) -> int:
    return sum(t.numel() * t.element_size() for t in td.values(include_nested=True, leaves_only=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--layouts", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    generator = load_generator(args.model)
    store = ConditionStore()
    env = LayoutEnv(generator, ShapesReward(), make_source(args.data, [2, 3, 4, 5, 6], seed=0), store,
                    layouts_per_reset=2, group_size=args.group, num_steps=args.steps)
    actor = make_actor(SDEPolicyNet(generator, store, noise_level=0.7, window_steps=2), env.action_spec)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(args.steps, actor, auto_reset=True)
    samples = args.layouts * args.group
    per_sample_full = nbytes(rollout) / rollout.shape[0]
    per_sample_final = nbytes(final_step(rollout)) / rollout.shape[0]
    print(f"{samples} samples × {args.steps} steps, latents {tuple(generator.latent_shape)}:")
    print(f"  whole rollout (ppo, grpo)   {per_sample_full * samples / 2**20:8.2f} MiB per iteration")
    print(f"  final step   (awm, nft)     {per_sample_final * samples / 2**20:8.2f} MiB per iteration "
          f"({per_sample_full / per_sample_final:.0f}× less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
