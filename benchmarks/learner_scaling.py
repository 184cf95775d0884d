"""Update throughput (samples / second) and bytes moved per update with 1, 2 … learner processes on this machine.

    python benchmarks/learner_scaling.py [--learners 1 2] [--layouts 8] [--group 4] [--steps 10] [--updates 3]
                                         [--algo grpo] [--model shapes-tiny] [--learner-cpus 1] [--out FILE.json]

One iteration's rollout is drawn once, in this process; every row then times ``--updates`` updates of it (after one
warm-up update, which for N ≥ 2 also hands the state to the learners), from the same starting state:

- 1: the learner's own ``update`` in this process, on ``--learner-cpus`` torch threads (what ``--learners 1`` runs);
- N ≥ 2: `diffrl.distributed.learners.LearnerGroup` as the trainer uses it — the rollout into the object store, one
  task through the mailbox, N gloo processes of ``--learner-cpus`` CPUs each on their pieces of every minibatch (by
  default ⌈m / N⌉ rows each), the gradients summed in float64, the trainable weights back from rank 0. The group's
  start (Ray Train's worker group, each replica built) is its own column, paid once per run.

Bytes per update: the gradients one learner reduces (``allreduce_bytes``; ddp: trainable parameters × 8 bytes, float64,
× optimizer steps; ``--strategy fsdp``: × 4 bytes, float32, × backward passes, reduce-scattered), the rollout put into
the object store, the weights rank 0 sends back, and the trainable weights one learner holds (``held``: all of them
with ddp, 1/N with fsdp). Printed as a table and, with ``--out``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import time

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.replica import build_learner, learner_replica
from diffrl.config import build_config
from diffrl.distributed.ray_workers import trainable_weights
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.rewards import ShapesReward


def rollout_of(cfg):
    """One iteration's rollout [B, T], its layouts and conditioning, and the initial trainable weights."""
    _, generator, store = learner_replica(cfg, torch.device("cpu"), {})
    env = LayoutEnv(generator, ShapesReward(), ShapesLayouts(seed=0), store, layouts_per_reset=cfg.env.layouts_per_iter,
                    group_size=cfg.env.group_size, num_steps=cfg.env.num_steps)
    _, actor = build_learner(cfg, generator, store, env)  # the trainer's rollout actor (an ODE one for AWM / NFT)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(cfg.env.num_steps, actor, auto_reset=True)
    return rollout, store, {name: value.clone() for name, value in trainable_weights(generator).items()}


def time_updates(cfg, rollout, store, initial, updates: int) -> dict:
    """Seconds per update (mean of ``updates`` after a warm-up) with cfg.ray.learners processes, and bytes moved."""
    learner, generator, driver_store = learner_replica(cfg, torch.device("cpu"), initial)
    driver_store.set(store.layouts, store.conditioning)
    row = {"learners": cfg.ray.learners, "samples_per_update": rollout.shape[0]}
    if cfg.ray.learners == 1:
        torch.set_num_threads(max(1, int(cfg.ray.learner_cpus)))
        times = []
        for _ in range(updates + 1):
            tic = time.perf_counter()
            learner.update(rollout.clone())
            times.append(time.perf_counter() - tic)
        held = sum(p.numel() * p.element_size() for p in generator.denoiser.parameters() if p.requires_grad)
        row.update(start_seconds=0.0, allreduce_bytes=0, rollout_bytes=0, weights_bytes=0, held_bytes=held)
    else:
        from diffrl.distributed.learners import LearnerGroup

        tic = time.perf_counter()
        with LearnerGroup(cfg, learner, generator, driver_store, learner_replica) as group:
            group._send_state()  # the start ends when every replica is built and holds the state
            row["start_seconds"] = time.perf_counter() - tic
            times, logs = [], {}
            for _ in range(updates + 1):
                tic = time.perf_counter()
                logs = group.update(rollout.clone())
                times.append(time.perf_counter() - tic)
        row.update(allreduce_bytes=logs["allreduce_bytes"], weights_bytes=logs["learner_sync_bytes"],
                   held_bytes=logs["learner_param_bytes"],
                   rollout_bytes=len(pickle.dumps(rollout.cpu())))
    seconds = sum(times[1:]) / updates
    row.update(seconds_per_update=seconds, samples_per_second=rollout.shape[0] / seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layouts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--learner-cpus", type=float, default=1.0)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                        help="ray.learner_strategy of the N ≥ 2 rows (fsdp: --algo ppo, grpo, awm or nft)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()

    import ray

    base = {"model": {"name": args.model}, "env": {"layouts_per_iter": args.layouts, "group_size": args.group,
                                                   "num_steps": args.steps},
            "algo": {"name": args.algo}, "ray": {"learner_cpus": args.learner_cpus}, "out": "/tmp/diffrl-learner-scaling"}
    cfg = build_config(base)
    torch.manual_seed(0)
    rollout, store, initial = rollout_of(cfg)
    need = max(args.learners) * args.learner_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False,
             logging_level=logging.WARNING)
    rows = []
    try:
        for n in args.learners:
            strategy = args.strategy if n > 1 else "ddp"
            cfg = build_config({**base, "ray": {"learners": n, "learner_cpus": args.learner_cpus,
                                                "learner_strategy": strategy}})
            torch.manual_seed(1)
            rows.append(time_updates(cfg, rollout, store, initial, args.updates))
    finally:
        ray.shutdown()
    print(f"{args.model}, --algo {args.algo}: {rollout.shape[0]} samples × {args.steps} steps per update, "
          f"{os.cpu_count()} CPUs, {args.learner_cpus:g} CPU(s) per learner, N ≥ 2: {args.strategy}")
    print("learners  start s  s/update  samples/s  all-reduced MB  rollout MB  weights back MB  held MB")
    for r in rows:
        print(f"{r['learners']:>8}  {r['start_seconds']:>7.1f}  {r['seconds_per_update']:>8.2f}  "
              f"{r['samples_per_second']:>9.1f}  {r['allreduce_bytes'] / 1e6:>14.2f}  {r['rollout_bytes'] / 1e6:>10.2f}  "
              f"{r['weights_bytes'] / 1e6:>15.2f}  {r['held_bytes'] / 1e6:>7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
