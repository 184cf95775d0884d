"""Rollout throughput (samples / second) with 0, 1, 2 … Ray rollout workers on this machine.

    python benchmarks/rollout_scaling.py [--workers 0 1 2] [--layouts 16] [--group 4] [--steps 10]
                                         [--iterations 3] [--worker-cpus 1] [--model shapes-tiny]

0 workers is the default in-process path (`LayoutEnv.rollout` on the learner's generator, no Ray) with
``--worker-cpus`` torch threads, so every row gives each rollout process the same compute. N workers is
`diffrl.distributed.ray_workers.ScaleOut` as the trainer uses it: each iteration puts the trainable
weights into the object store once, the workers load them, denoise the iteration's chunks (2 per
worker), score them with the Shapes reward and send them back; the driver assembles them in chunk order.
A row's time is the mean over ``--iterations`` iterations after one warm-up iteration, sync included, the
learner's update excluded. Also printed: the bytes of weights sent out and of rollouts sent back per
iteration, and the Shapes reward's own throughput — what else bounds scaling across nodes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.config import build_config, chunk_layouts
from diffrl.distributed.ray_workers import ScaleOut
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import load_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards import ShapesReward
from diffrl.shapes.world import render, sample_layouts


def in_process(cfg, iterations: int) -> float:
    """Seconds per iteration of the default in-process rollout."""
    generator = load_generator(cfg.model.name)
    store = ConditionStore()
    env = LayoutEnv(generator, ShapesReward(), ShapesLayouts(seed=0), store, layouts_per_reset=cfg.env.layouts_per_iter,
                    group_size=cfg.env.group_size, num_steps=cfg.env.num_steps)
    actor = make_actor(SDEPolicyNet(generator, store, cfg.policy.noise_level, 2), env.action_spec)
    times = []
    for _ in range(iterations + 1):
        tic = time.perf_counter()
        with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
            env.rollout(cfg.env.num_steps, actor, auto_reset=True)
        times.append(time.perf_counter() - tic)
    return sum(times[1:]) / iterations


def on_workers(cfg, iterations: int) -> tuple[float, int, int]:
    """Seconds per iteration with cfg.ray.workers Ray workers, the bytes synced to them and the rollout bytes
    they send back, per iteration."""
    generator = load_generator(cfg.model.name)
    source = ShapesLayouts(seed=0)
    times, synced, returned = [], 0, 0
    with ScaleOut(cfg, generator, torch.device("cpu")) as scale:
        for iteration in range(iterations + 1):
            tic = time.perf_counter()
            got = scale.collect(iteration, source.sample(cfg.env.layouts_per_iter))
            times.append(time.perf_counter() - tic)
            synced = got.stats["sync_bytes"]
            returned = sum(v.numel() * v.element_size() for v in got.rollout.values(True, True))
    return sum(times[1:]) / iterations, synced, returned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layouts", type=int, default=16, help="layouts per iteration")
    parser.add_argument("--group", type=int, default=4, help="samples per layout")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per row (after one warm-up)")
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs (and torch threads) per rollout process")
    parser.add_argument("--model", default="shapes-tiny")
    args = parser.parse_args()

    threads = max(1, int(args.worker_cpus))
    torch.set_num_threads(threads)
    base = [("model.name", args.model), ("env.layouts_per_iter", args.layouts), ("env.group_size", args.group),
            ("env.num_steps", args.steps), ("ray.worker_cpus", args.worker_cpus)]
    samples = args.layouts * args.group
    print(f"machine: {os.cpu_count()} CPUs; batch {samples} samples ({args.layouts} layouts × {args.group}), "
          f"{args.steps} steps, {threads} torch thread(s) per rollout process, model {args.model}")
    print(f"{'workers':>7}  {'chunks':>6}  {'s / iteration':>13}  {'samples / s':>11}  {'speed-up':>8}  "
          f"{'weights out / iter':>18}  {'rollouts back / iter':>20}")
    first = None
    started_ray = False
    for n in args.workers:
        cfg = build_config(overrides=[*base, ("ray.workers", n)])
        if n == 0:
            seconds, synced, returned, chunks = in_process(cfg, args.iterations), 0, 0, 1
        else:
            if not started_ray:
                import ray

                cpus = max(os.cpu_count() or 1, math.ceil(max(args.workers) * args.worker_cpus))
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
                started_ray = True
            seconds, synced, returned = on_workers(cfg, args.iterations)
            chunks = -(-args.layouts // chunk_layouts(cfg))
        first = first or seconds
        print(f"{n:>7}  {chunks:>6}  {seconds:>13.3f}  {samples / seconds:>11.1f}  {first / seconds:>7.2f}×  "
              f"{synced / 2**20:>14.1f} MiB  {returned / 2**20:>16.1f} MiB")
    layouts = sample_layouts(samples, [2, 3, 4, 5, 6], seed=0)
    images = render(layouts, size=32)
    reward = ShapesReward()
    reward(images, layouts)  # warm-up
    tic = time.perf_counter()
    for _ in range(3):
        reward(images, layouts)
    print(f"Shapes reward alone: {3 * samples / (time.perf_counter() - tic):.0f} images / s on one thread")


if __name__ == "__main__":
    main()
