"""How much of a model's headroom is already on-policy: one sample against the best of N, per held-out layout.

    python experiments/best_of_n.py [MODEL_OR_RUN ...] [--n 8] [--world classic|loose] [--layouts 250] [--json PATH]

For a generator (a registered name such as ``shapes-tiny``, a generator folder) or a `diffrl train` run folder
(its last checkpoint), draws ``--n`` deterministic ODE samples of each of the held-out layouts that
`diffrl train` scores (``eval.*`` defaults: 250 L2–L6 layouts, seed 1234, of ``--world``'s box rules: by default the
world of the first run's training data, or the world the first model was pre-trained in, as `diffrl train` picks
it), each from its own initial noise (seeds 1234, 1235, ...; the first is the summary's own), and reports

  one sample      ISR of the first noise (what `diffrl train`'s summary prints) and the mean over the N noises
  best by reward  ISR when each layout keeps the sample the reward ranks first: what a learner that makes the
                  reward's favourite likely could reach
  best by ISR     the same with the oracle's pick (the sample with the most instances right)
  any right       the fraction of instances drawn right in at least one of the N samples

A learner's captured fraction of the headroom is (its ISR − one sample) / (best by reward − one sample).
Prints a table; ``--json`` (default ``experiments/best_of_n.json``) writes every number. Nothing is trained here:
`experiments/headroom.py` measures the other headroom, how far supervised flow matching (on exact renders, or on the
model's own best samples) moves the weights in the time a run trains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from diffrl.config import EvalConfig, ModelConfig
from diffrl.envs.datasets import model_data, shapes_world
from diffrl.eval.evaluate import _sample, held_out_layouts
from diffrl.eval.metrics import concat_info
from diffrl.rewards.shapes import ShapesReward

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)


def load(name: str):
    path = Path(name)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        from diffrl.algos.export import load_run

        return load_run(path)[1]
    from diffrl.policies.generator import load_generator

    return load_generator(name)


@torch.no_grad()
def best_of_n(generator, layouts, n: int, seed: int, num_steps: int = 10) -> dict:
    reward = ShapesReward()
    rewards, success = [], []
    for i in range(n):
        outputs, _ = _sample(generator, reward, layouts, num_steps=num_steps, shift=0.0, batch_size=125, seed=seed + i,
                             progress=False, desc="")
        rewards.append(torch.cat([o.rewards for o in outputs])[: len(layouts)])
        success.append(concat_info(outputs, "success", len(layouts)))
    mask = concat_info(outputs, "instance_mask", len(layouts))  # [L, K], the same layouts for every noise
    success = torch.stack(success)  # [N, L, K]
    rewards = torch.stack(rewards)  # [N, L]
    instances = mask.sum()
    right = (success & mask).sum(-1).float()  # [N, L] instances right per sample
    rows = torch.arange(len(layouts))
    by_reward = right[rewards.argmax(0), rows].sum() / instances
    by_isr = right.max(0).values.sum() / instances
    return {"n": n, "layouts": len(layouts), "instances": int(instances),
            "one_sample": float(right[0].sum() / instances),
            "mean_over_noises": float(right.sum(1).mean() / instances),
            "best_by_reward": float(by_reward), "best_by_isr": float(by_isr),
            "any_right": float((success.any(0) & mask).sum() / instances)}


def main(argv=None) -> int:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=[ModelConfig().name], help="registered models, folders or run folders")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--world", choices=["classic", "loose"], help="box rules of the held-out layouts (default: the "
                        "first model's own world)")
    parser.add_argument("--layouts", type=int, default=defaults.layouts)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_json_option(parser, __file__)
    args = parser.parse_args(argv)
    if args.world is None:  # a run's own training data (config.yaml has it resolved), or the model's world
        run_config = Path(args.models[0]) / "config.yaml"
        data = yaml.safe_load(run_config.read_text())["env"]["data"] if run_config.is_file() else model_data(args.models[0])
        args.world = shapes_world(data) or "classic"
    layouts = held_out_layouts(args.layouts, defaults.levels, args.seed, world=args.world)
    results = {}
    print(f"{'model':40s} one     mean    best/reward  best/ISR  any right   (N={args.n}, {len(layouts)} layouts)")
    for name in args.models:
        r = best_of_n(load(name), layouts, args.n, args.seed)
        results[name] = r
        print(f"{name:40s} {r['one_sample']:.3f}   {r['mean_over_noises']:.3f}   {r['best_by_reward']:.3f}        "
              f"{r['best_by_isr']:.3f}     {r['any_right']:.3f}", flush=True)
    write_json(args, __file__, world=args.world, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
