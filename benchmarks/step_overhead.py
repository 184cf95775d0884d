"""Per-denoising-step overhead of env + actor over the raw backbone forward, at the default config.

    python benchmarks/step_overhead.py [--batch 64] [--steps 10] [--repeats 5]

"raw" times ``denoiser(x_t, t, cond)`` alone on a batch whose conditioning is already gathered.
"env + actor" times a full ``env.rollout`` (TensorDict plumbing, ConditionStore lookup, SDE mean/std,
sampling and log-prob, env step) divided by its number of steps, with a reward that costs nothing,
so the reward model's time (reported on its own line) is not counted as env overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import load_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards import Reward, RewardOutput, ShapesReward


class FreeReward(Reward):
    def __call__(self, images, layouts):
        return RewardOutput(torch.zeros(images.shape[0], device=images.device))


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--batch", type=int, default=64, help="samples per rollout (16 layouts × group 4)")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    generator = load_generator(args.model)
    store = ConditionStore()
    env = LayoutEnv(generator, FreeReward(), ShapesLayouts(seed=0), store,
                    layouts_per_reset=args.batch // args.group, group_size=args.group, num_steps=args.steps)
    actor = make_actor(SDEPolicyNet(generator, store, noise_level=0.7, window_steps=2), env.action_spec)

    td = env.reset()
    cond = store[td["layout_index"]]
    x, t = td["latent"], td["sigma"]

    def raw():
        for _ in range(args.steps):
            generator.denoiser(x, t, cond)

    def rollout():
        with set_exploration_type(ExplorationType.RANDOM):
            env.rollout(args.steps, actor, auto_reset=True)

    raw(), rollout()  # warm-up
    raw_step = best_of(args.repeats, raw) / args.steps
    env_step = best_of(args.repeats, rollout) / args.steps
    images, layouts = torch.rand(args.batch, 3, 32, 32), env.sample_layouts
    reward_time = best_of(args.repeats, lambda: ShapesReward()(images, layouts))
    print(f"config: batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads, model {args.model}")
    print(f"raw backbone forward      {raw_step * 1e3:8.2f} ms / step")
    print(f"env + actor (full step)   {env_step * 1e3:8.2f} ms / step")
    print(f"overhead                  {100 * (env_step - raw_step) / raw_step:8.2f} %")
    print(f"Shapes reward (per image batch, once per episode) {reward_time * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
