"""What a GRPO group's advantage is about: the within-group spread of the Shapes reward, split into its parts.

    python experiments/reward_parts.py [--rollouts 4] [--seed 7] [--threads 2] [--json PATH]

Rolls out the shipped base model as `diffrl train` does (its default env, window and noise level; 64 layouts × 4 per
rollout), once with independent initial noise per sample and once with a group's samples sharing it
(``env.share_noise``). Per image the reward is r = mean_i IoU_i + mean_i c_i (c: the shape confidence), so within each
group var(r) = var(IoU) + var(c) + 2·cov(IoU, c); the table gives each part, pooled over all groups, and the
correlation of a sample's reward with its ISR (share of its instances that succeed) and with its mean IoU, each
taken relative to its group's mean, as GRPO's advantage is.
"""

from __future__ import annotations

import argparse

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.config import TrainConfig, window_steps
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import build_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards import ShapesReward

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)


def rollout_parts(generator, cfg: TrainConfig, share_noise: bool, rollouts: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-sample reward, mean IoU, mean confidence and ISR of ``rollouts`` default rollouts, each centred on its
    group's mean: {name: [rollouts · B]}."""
    store = ConditionStore()
    e = cfg.env
    env = LayoutEnv(generator, ShapesReward(), ShapesLayouts(e.levels, seed=seed), store, layouts_per_reset=e.layouts_per_iter,
                    group_size=e.group_size, num_steps=e.num_steps, shift=e.shift, seed=seed, share_noise=share_noise)
    actor = make_actor(SDEPolicyNet(generator, store, cfg.policy.noise_level, window_steps(cfg)), env.action_spec)
    parts: dict[str, list[torch.Tensor]] = {"reward": [], "iou": [], "confidence": [], "isr": []}
    for _ in range(rollouts):
        with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
            env.rollout(e.num_steps, actor, auto_reset=True)
        _, _, out = env.last
        mask = out.info["instance_mask"].float()
        count = mask.sum(1)
        per_image = {"reward": out.rewards.float(), **{name: (out.info[key].float() * mask).sum(1) / count for name, key in
                                                       (("iou", "iou"), ("confidence", "confidence"), ("isr", "success"))}}
        for name, value in per_image.items():
            grouped = value.view(e.layouts_per_iter, e.group_size)
            parts[name].append((grouped - grouped.mean(1, keepdim=True)).flatten())
    return {name: torch.cat(values) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=4, help="default-size rollouts per row")
    parser.add_argument("--seed", type=int, default=7, help="seed of the layouts and the noise")
    parser.add_argument("--threads", type=int, default=2)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    if args.rollouts < 1:
        parser.error(f"--rollouts must be ≥ 1, got {args.rollouts}")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    generator = build_generator(cfg.model, cfg.policy.train)
    print("| initial noise | samples | within-group var(r) | IoU part | confidence part | 2·cov | corr(r, ISR) | corr(r, IoU) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for share in (False, True):
        p = rollout_parts(generator, cfg, share, args.rollouts, args.seed)
        var = {name: float((value**2).mean()) for name, value in p.items()}
        cov2 = 2 * float((p["iou"] * p["confidence"]).mean())
        corr = {name: float(torch.corrcoef(torch.stack([p["reward"], p[name]]))[0, 1]) for name in ("isr", "iou")}
        print(f"| {'shared by a group' if share else 'one per sample'} | {p['reward'].numel()} | {var['reward']:.4f} | "
              f"{var['iou']:.4f} | {var['confidence']:.4f} | {cov2:.4f} | {corr['isr']:.3f} | {corr['iou']:.3f} |",
              flush=True)
        rows.append({"initial_noise": "shared by a group" if share else "one per sample",
                     "samples": p["reward"].numel(), "var_reward": var["reward"], "var_iou": var["iou"],
                     "var_confidence": var["confidence"], "cov2": cov2, "corr_reward_isr": corr["isr"],
                     "corr_reward_iou": corr["iou"]})
    write_json(args, __file__, rows=rows)


if __name__ == "__main__":
    main()
