"""The variance of the AWM / NFT gradient over the (t, ε) draws, with and without common random numbers.

    python benchmarks/crn_variance.py [--model shapes-mislabeled] [--data DATA] [--layouts 16] [--group 4]
                                      [--repeats 12] [--algo awm] [--awm-power 0.25] [--json out.json]

Rolls out the model once as `diffrl train` does for a forward-process learner (ODE samples, ``--group`` per
layout), scores them, and keeps that batch fixed. Then it computes the learner's gradient ``--repeats`` times, each
time with fresh (t, ε) draws, once with the group's samples sharing their draws (``forward.crn=true``, the default)
and once with every sample drawing its own. Per mode it prints the total variance of the gradient over the draws
(the mean squared distance of a draw's gradient from their mean, summed over parameters), the norm of the mean
gradient, and their ratio — how many draws' worth of noise one update carries. Only the draws differ between
modes: same samples, same advantages, same weights. ``--data`` defaults to the model's own Shapes world (as
`diffrl train`'s env.data=''), ``--awm-power`` to forward.awm_power (1: the plain matching loss).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.advantages import group_advantages
from diffrl.algos.forward import FinalSamples, awm_loss, group_times_noise, nft_loss, nft_reward
from diffrl.config import ForwardConfig
from diffrl.envs.datasets import make_source, model_data
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import load_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards.shapes import ShapesReward


def gradients(generator, store, samples: FinalSamples, advantages, times, k: int, crn: bool, algo: str, repeats: int,
              seed: int, awm_power: float = 1.0) -> torch.Tensor:
    """[repeats, P] flattened gradients of the policy loss, one per fresh (t, ε) draw."""
    params = [p for p in generator.denoiser.parameters() if p.requires_grad]
    fwd = ForwardConfig()
    out = []
    torch.manual_seed(seed)
    for _ in range(repeats):
        t_all, noise_all = group_times_noise(samples.layout_index, k, samples.x0.shape[1:], times, crn)
        generator.denoiser.zero_grad(set_to_none=True)
        for j in range(k):
            t, noise = t_all[j], noise_all[j]
            x_t = generator.sampler.noisy(samples.x0, noise, t)
            target = generator.sampler.target(samples.x0, noise, t)
            cond = store[samples.layout_index]
            velocity = generator.velocity(x_t, t, cond)
            if algo == "awm":
                loss = awm_loss(velocity, target, advantages, t, awm_power)
            else:
                loss = nft_loss(velocity, velocity.detach(), x_t, samples.x0, t, nft_reward(advantages, fwd.adv_clip),
                                fwd.nft_beta, fwd.adv_clip)
            (loss / k).backward()
        out.append(torch.cat([p.grad.flatten() for p in params]))
    return torch.stack(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-mislabeled")
    parser.add_argument("--data", default="", help="a Shapes dataset (default: the model's own world)")
    parser.add_argument("--layouts", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--timesteps", type=int, default=ForwardConfig().timesteps)
    parser.add_argument("--algo", default="awm", choices=["awm", "nft"])
    parser.add_argument("--awm-power", type=float, default=ForwardConfig().awm_power)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = load_generator(args.model)
    store = ConditionStore()
    data = args.data or model_data(args.model)
    env = LayoutEnv(generator, ShapesReward(), make_source(data, [2, 3, 4, 5, 6], seed=args.seed), store,
                    layouts_per_reset=args.layouts, group_size=args.group, num_steps=10, seed=args.seed)
    actor = make_actor(SDEPolicyNet(generator, store, noise_level=0.0, window_steps=0), env.action_spec)
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        samples = FinalSamples.of(env.rollout(10, actor, auto_reset=True))
    advantages = group_advantages(samples.rewards, samples.layout_index)
    times = env.sigmas[env.sigmas > 0]
    results = {}
    print(f"{args.algo}: {args.layouts} layouts × {args.group} ODE samples, K={args.timesteps}, {args.repeats} draws")
    print("mode        total variance   |mean gradient|²   variance / |mean|²   seconds")
    for crn in (True, False):
        tic = time.time()
        grads = gradients(generator, store, samples, advantages, times, args.timesteps, crn, args.algo, args.repeats,
                          args.seed + 1, args.awm_power)
        mean = grads.mean(0)
        variance = float(((grads - mean) ** 2).sum(1).mean())
        signal = float((mean**2).sum())
        name = "shared" if crn else "independent"
        results[name] = {"total_variance": variance, "mean_grad_sq_norm": signal, "ratio": variance / signal,
                         "seconds": time.time() - tic}
        print(f"{name:11s} {variance:.4e}       {signal:.4e}         {variance / signal:8.2f}           "
              f"{time.time() - tic:.0f}", flush=True)
    cut = results["independent"]["total_variance"] / results["shared"]["total_variance"]
    print(f"variance cut by sharing (t, ε) in a group: {cut:.1f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
