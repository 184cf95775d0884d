"""Per-denoising-step overhead of env + actor over the raw backbone forward, at the default config.

    python benchmarks/step_overhead.py [--batch 64] [--steps 10] [--repeats 15]

"raw" times ``denoiser(x_t, t, cond)`` alone, ten times in a loop, on a batch whose conditioning is already
gathered. "env + actor" times a full ``env.rollout`` (TensorDict plumbing, ConditionStore lookup, SDE mean/std,
sampling and log-prob, env step) divided by its number of steps, with a reward that costs nothing, so the reward
model's time (reported on its own line) is not counted as env overhead. The two alternate, repeat after repeat,
and each overhead is the median of the repeats' own ratios: a shared 2-core VM's speed drifts by tens of percent
within a minute, so two blocks timed apart disagree by more than the overhead (1 % to 18 % on the same code).

Two overheads are printed. "over the backbone alone" is the full step against the raw loop. "outside the
backbone" is the rollout's time outside its own backbone forwards (timed by hooks inside the same rollouts), which
is what the env and actor's code costs. They differ when the backbone itself runs slower inside the rollout. It
did, by 15–40 %, with glibc's allocator defaults, which unmap and re-fault every large tensor a rollout frees; the
benchmark runs with the `diffrl` command's allocator settings (`diffrl.allocator`); ``DIFFRL_MALLOC=default``
shows glibc's.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.allocator import tune_malloc
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import load_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards import Reward, RewardOutput, ShapesReward


class FreeReward(Reward):
    def __call__(self, images, layouts):
        return RewardOutput(torch.zeros(images.shape[0], device=images.device))


class ForwardClock:
    """Seconds spent inside a module's forward calls, summed (forward pre-/post-hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._tic = 0.0, 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._tic = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._tic


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--batch", type=int, default=64, help="samples per rollout (16 layouts × group 4)")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15, help="alternating timings of the raw loop and of a rollout")
    args = parser.parse_args()
    tuned = tune_malloc()  # as the `diffrl` command does (DIFFRL_MALLOC=default: glibc's own settings)

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
    clock = ForwardClock(generator.denoiser)
    raw_s, env_s, inside = [], [], []
    for _ in range(args.repeats):  # interleaved, so that the "alone" line sees the same machine
        raw_s.append(timed(raw))
        clock.seconds = 0.0
        env_s.append(timed(rollout))
        inside.append(clock.seconds)
    raw_s, env_s, inside = torch.tensor(raw_s), torch.tensor(env_s), torch.tensor(inside)
    quartiles = torch.tensor([0.25, 0.5, 0.75])
    alone = torch.quantile(100 * (env_s / raw_s - 1), quartiles).tolist()
    outside = torch.quantile(100 * (env_s / inside - 1), quartiles).tolist()
    images, layouts = torch.rand(args.batch, 3, 32, 32), env.sample_layouts
    reward_time = torch.tensor([timed(lambda: ShapesReward()(images, layouts)) for _ in range(args.repeats)]).median()
    per_step = 1e3 / args.steps
    print(f"config: batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads, model {args.model}, "
          f"{args.repeats} repeats (medians), malloc {'tuned' if tuned else 'default'}")
    print(f"raw backbone forward, alone            {raw_s.median() * per_step:8.2f} ms / step")
    print(f"backbone forward inside the rollouts   {inside.median() * per_step:8.2f} ms / step")
    print(f"env + actor (full step)                {env_s.median() * per_step:8.2f} ms / step")
    print(f"overhead over the backbone alone       {alone[1]:8.2f} % (quartiles {alone[0]:.2f} % / {alone[2]:.2f} %)")
    print(f"overhead outside the backbone          {outside[1]:8.2f} % (quartiles {outside[0]:.2f} % / "
          f"{outside[2]:.2f} %)")
    print(f"Shapes reward (per image batch, once per episode) {reward_time * 1e3:.2f} ms (median)")


if __name__ == "__main__":
    main()
