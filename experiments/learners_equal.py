"""2 learners against 1 process on the same samples: how far apart one update leaves the parameters, and why.

    python experiments/learners_equal.py [--algo ppo|grpo|nft|awm] [--lr LR] [--json out.json]

One iteration's rollout of the Shapes default (3 layouts × 2 samples, 3 steps; PPO and GRPO in minibatches of 4 and
2 rows), updated from the same state and RNG by one process and by 2 gloo processes (`torch.distributed`, no Ray:
the arithmetic of ``--learners 2`` without its transport, which `tests/test_learners.py` covers) in two settings:

  same pieces     the one process runs the 2 learners' pieces (``algo.micro_batch`` as ``--learners 2`` resolves it)
  default pieces  the one process runs whole minibatches (its default, ``--learners 1``), the learners ⌈m/2⌉ rows each

For each: the largest parameter difference, the gradient's relative difference before the clip (largest over
parameter tensors, first optimizer step), how many coordinates with |g| > 1e-8 had opposite signs (AdamW's first
step moves each by ±lr, so a flip moves it 2·lr apart), and the logged values that differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.replica import build_learner, learner_replica
from diffrl.config import build_config, micro_batch
from diffrl.distributed.learners import Shard
from diffrl.envs.layout_env import LayoutEnv
from diffrl.rewards import ShapesReward
from diffrl.shapes.world import sample_layouts

GRADS: list = []  # every optimizer step's gradients before the clip, of this process


def record_grads() -> None:
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, *args, **kwargs):
        params = list(params)
        GRADS.append([None if p.grad is None else p.grad.detach().clone() for p in params])
        return clip(params, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording


class Layouts:
    def sample(self, n):
        return sample_layouts(n, [2, 3], seed=1)


def config(algo: str, lr: float | None, learners: int = 2):
    overrides = {"env": {"layouts_per_iter": 3, "group_size": 2, "num_steps": 3}, "ray": {"learners": learners},
                 "algo": {"name": algo, **({"minibatch_size": 4} if algo in ("ppo", "grpo") else {}),
                          **({"lr": lr} if lr else {})}}
    return build_config(overrides)


def learner_process(rank: int, world: int, folder: str, algo: str, lr: float | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=world)
    data = torch.load(f"{folder}/data.pt", weights_only=False)
    learner, generator, store = learner_replica(config(algo, lr), torch.device("cpu"), data["initial"])
    store.set(data["layouts"], generator.encode_layouts(data["layouts"]))
    learner.shard = Shard(rank, world)
    GRADS.clear()
    torch.manual_seed(5)
    logs = learner.update(data["rollout"].clone())
    if rank == 0:
        params = {k: p.detach().clone() for k, p in generator.denoiser.named_parameters() if p.requires_grad}
        torch.save({"params": params, "grads": GRADS, "logs": logs}, f"{folder}/two.pt")
    dist.destroy_process_group()


def one_process(cfg, data):
    learner, generator, store = learner_replica(cfg, torch.device("cpu"), data["initial"])
    store.set(data["layouts"], generator.encode_layouts(data["layouts"]))
    GRADS.clear()
    torch.manual_seed(5)
    logs = learner.update(data["rollout"].clone())
    params = {k: p.detach().clone() for k, p in generator.denoiser.named_parameters() if p.requires_grad}
    return {"params": params, "grads": list(GRADS), "logs": logs}


def compare(one: dict, two: dict, initial: dict) -> dict:
    g1, g2 = one["grads"][0], two["grads"][0]
    pairs = [(a, b) for a, b in zip(g1, g2) if a is not None and b is not None]
    logs = {k: [v, two["logs"].get(k)] for k, v in one["logs"].items()
            if not math.isclose(two["logs"].get(k, math.nan), v, rel_tol=1e-6, abs_tol=1e-9)}
    return {
        "max_param_difference": max(float((one["params"][k] - two["params"][k]).abs().max()) for k in initial),
        "max_param_moved": max(float((one["params"][k] - initial[k]).abs().max()) for k in initial),
        "max_grad_relative_difference": max(float((a - b).norm() / (a.norm() + 1e-30)) for a, b in pairs),
        "sign_flips": sum(int(((a > 0) != (b > 0)).logical_and((a.abs() > 1e-8) | (b.abs() > 1e-8)).sum())
                          for a, b in pairs),
        "logs_differing": logs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--lr", type=float, default=None, help="default: the learner's own")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    record_grads()
    cfg = config(args.algo, args.lr)
    learner, generator, store = learner_replica(cfg, torch.device("cpu"), {})
    initial = {k: p.detach().clone() for k, p in generator.denoiser.named_parameters() if p.requires_grad}
    env = LayoutEnv(generator, ShapesReward(), Layouts(), store, layouts_per_reset=cfg.env.layouts_per_iter,
                    group_size=cfg.env.group_size, num_steps=cfg.env.num_steps, device=torch.device("cpu"))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(cfg.env.num_steps, build_learner(cfg, generator, store, env)[1], auto_reset=True)
    data = {"initial": initial, "rollout": rollout, "layouts": list(store.layouts)}
    with tempfile.TemporaryDirectory() as folder:
        torch.save(data, f"{folder}/data.pt")
        mp.start_processes(learner_process, args=(2, folder, args.algo, args.lr), nprocs=2, start_method="fork")
        two = torch.load(f"{folder}/two.pt", weights_only=False)
    result = {"algo": args.algo, "lr": cfg.algo.lr, "micro_batch of --learners 2": micro_batch(cfg),
              "same pieces": compare(one_process(cfg, data), two, initial),
              "default pieces": compare(one_process(config(args.algo, args.lr, learners=1), data), two, initial)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
