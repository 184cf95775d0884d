"""How much signal is in one policy-gradient estimate? Three measurements on the shipped model.

    python experiments/gradient_signal.py [--model shapes-tiny] [--batches 4] [--json PATH]

1. **Who decides the outcome.** Within-group reward std (16·K samples, K = 8 per layout) when only the
   initial noise varies (ODE sampling) and when the initial noise is shared and only the RL window's
   SDE noise varies. If the window's noise barely moved the reward, RL on the window could not learn.
2. **Agreement of independent estimates.** Cosine between GRPO gradients (group-normalised advantage
   × ∇ log π over the window steps) from independent batches of 64 and of 256 samples.
3. **Does the gradient point uphill?** One sign step (the size of Adam's first step) of a few sizes
   along the gradient summed over ``--batches`` × 64 samples, against one along a random-sign
   direction with the same magnitudes, scored by the held-out reward and ISR (100 L2–L6 layouts, ODE).

The gradient is the one the learners take at their first, on-policy step (ratio 1), written out
directly with the SDE step's mean and log-density so each number is one forward/backward away.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from diffrl.envs.layout_env import flow_sigmas
from diffrl.eval.evaluate import evaluate, held_out_layouts
from diffrl.policies.generator import load_generator
from diffrl.policies.sde import gaussian_log_prob, sde_mean_std
from diffrl.rewards import ShapesReward
from diffrl.shapes.world import sample_layouts

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)

LEVELS = [2, 3, 4, 5, 6]


def rollout(generator, layouts, group, sigmas, noisy_steps, noise_level, shared_init, seed):
    """→ (final latents [B, C, H, W], [(step, x_t, x_next)] of the noisy steps, conditioning, sample layouts)."""
    index = torch.arange(len(layouts)).repeat_interleave(group)
    cond = generator.encode_layouts(layouts)[index]
    rng = torch.Generator().manual_seed(seed)
    shape = generator.latent_shape
    x = torch.randn(len(layouts), *shape, generator=rng)[index] if shared_init else torch.randn(len(index), *shape, generator=rng)
    steps = []
    with torch.no_grad():
        for s in range(len(sigmas) - 1):
            v = generator.velocity(x, sigmas[s].expand(len(index)), cond)
            mean, std = sde_mean_std(v, sigmas[s], sigmas[s + 1], x, noise_level if s in noisy_steps else 0.0)
            x_next = mean + std * torch.randn(mean.shape, generator=rng)
            if s in noisy_steps:
                steps.append((s, x, x_next))
            x = x_next
    return x, steps, cond, [layouts[i] for i in index.tolist()]


def grpo_gradient(generator, params, reward, sigmas, seed, layouts_per_batch=16, group=4, window=2, noise_level=0.7):
    """Flattened ∇θ of −mean(A · Σ_window log π) on one fresh batch; A group-normalised as in GRPO."""
    layouts = sample_layouts(layouts_per_batch, LEVELS, seed=seed)
    x, steps, cond, sample_layouts_ = rollout(generator, layouts, group, sigmas, range(window), noise_level, False, seed)
    r = reward(generator.space.decode(x), sample_layouts_).rewards.float().reshape(layouts_per_batch, group)
    advantage = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
    generator.zero_grad()
    for s, x_t, x_next in steps:
        v = generator.velocity(x_t, sigmas[s].expand(len(advantage)), cond)
        mean, std = sde_mean_std(v, sigmas[s], sigmas[s + 1], x_t, noise_level)
        (-(advantage * gaussian_log_prob(x_next, mean, std)).mean()).backward()
    return torch.cat([p.grad.flatten() for p in params]).clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--batches", type=int, default=4, help="64-sample batches summed for the uphill test")
    parser.add_argument("--threads", type=int, default=2)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = load_generator(args.model)
    reward = ShapesReward()
    sigmas = flow_sigmas(10)
    params = [p for p in generator.denoiser.parameters() if p.requires_grad]
    tic = time.time()
    numbers: dict = {"reward_std": [], "cosine": [], "sign_steps": []}

    print("1. within-group reward std (24 layouts × 8 samples, L2–L6)")
    layouts = sample_layouts(24, LEVELS, seed=7, balanced=True)
    for name, noisy, shared in [("initial noise only (ODE)", [], False), ("window noise only (steps 0–1)", [0, 1], True)]:
        x, _, _, per_sample = rollout(generator, layouts, 8, sigmas, noisy, 0.7, shared, seed=0)
        r = reward(generator.space.decode(x), per_sample).rewards.reshape(24, 8)
        print(f"   {name:32s} mean {r.mean():.3f}  within-group std {r.std(1).mean():.3f}")
        numbers["reward_std"].append({"noise": name, "mean": float(r.mean()),
                                      "within_group_std": float(r.std(1).mean())})

    print("2. cosine between gradients of independent batches")
    for layouts_per_batch in (16, 64):
        grads = [grpo_gradient(generator, params, reward, sigmas, 100 + i + 10 * layouts_per_batch, layouts_per_batch)
                 for i in range(4)]
        cos = [float(torch.nn.functional.cosine_similarity(a, b, 0)) for a, b in itertools.combinations(grads, 2)]
        print(f"   {layouts_per_batch * 4:4d} samples: mean {sum(cos) / len(cos):+.3f}  pairs {[round(c, 3) for c in cos]}")
        numbers["cosine"].append({"samples": layouts_per_batch * 4, "mean": sum(cos) / len(cos), "pairs": cos})

    print(f"3. one sign step along the {args.batches * 64}-sample gradient vs a random-sign direction "
          "(held-out reward, ISR on 100 layouts)")
    eval_set = held_out_layouts(100, LEVELS, 1234)

    def score(direction: str, size: float | None) -> str:
        m, _ = evaluate(generator, reward, eval_set, num_steps=10, batch_size=100, progress=False)
        numbers["sign_steps"].append({"direction": direction, "size": size, "reward": m["reward"], "isr": m["isr"]})
        return f"reward {m['reward']:.4f}  ISR {m['isr']:.4f}"

    base = [p.detach().clone() for p in params]
    print(f"   base                 {score('base', None)}")
    direction = -sum(grpo_gradient(generator, params, reward, sigmas, 500 + i) for i in range(args.batches))
    random_sign = torch.randn(direction.shape, generator=torch.Generator().manual_seed(0)).sign()
    for name, step_dir in [("gradient", direction.sign()), ("random", random_sign)]:
        for size in (1e-5, 3e-5, 1e-4):
            with torch.no_grad():
                offset = 0
                for p, b in zip(params, base):
                    p.copy_(b + size * step_dir[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            print(f"   {name:8s} step {size:.0e}  {score(name, size)}")
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    print(f"({time.time() - tic:.0f} s, {args.threads} threads)")
    write_json(args, __file__, seconds=time.time() - tic, **numbers)


if __name__ == "__main__":
    main()
