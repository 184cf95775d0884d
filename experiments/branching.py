"""Which denoising step's noise decides an instance's shape, and which its box? Branch the sampler at one step.

    python experiments/branching.py [--model shapes-tiny] [--noise-levels 0.7 0.1 0.02] [--layouts 100] [--branches 4]
                                   [--json PATH]

For each noise level a and each step k: every layout's image is sampled by the deterministic ODE from one fixed
initial noise up to step k; step k is the SDE step at level a (`diffrl.policies.sde`), drawn ``--branches`` times
independently; each branch then finishes by the ODE. The branches of a layout differ only by that one step's noise,
so an instance whose verdict differs between them was decided there. Per (a, k) the table gives the per-pixel std
of that step's noise, ISR over all branches, the fractions of instances whose shape verdict, box verdict
(IoU ≥ 0.5) and success differ between branches, and the within-layout std of the reward (what GRPO's group
advantage divides by); the last columns split "shape differs" by box size (shorter side in grid cells, the bins of
``experiments/box_sizes.py``). The layouts are the default held-out set's kind (`EvalConfig`'s levels and seed).
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from diffrl.config import EnvConfig, EvalConfig
from diffrl.errors import UserError
from diffrl.eval.evaluate import held_out_layouts
from diffrl.policies.generator import load_generator
from diffrl.policies.sde import gaussian_step
from diffrl.rewards import build_reward

from _results import add_json_option, write_json  # this folder's modules (a script's folder is on sys.path)
from box_sizes import SIZE_BINS, size_bin


def differs(verdict: torch.Tensor, layouts: int, branches: int, mask: torch.Tensor) -> float:
    """Fraction of real instances whose bool verdict [N·G, K] is not the same in all G branches of its layout."""
    v = verdict.view(layouts, branches, -1)
    split = (v.any(1) & ~v.all(1)) & mask
    return split.sum().item() / mask.sum().item() if mask.any() else float("nan")


@torch.no_grad()
def ode_path(generator, cond, times, seed: int) -> list[torch.Tensor]:
    """The deterministic path every branch shares up to its step: x at steps 0 … T−1 from one fixed initial noise."""
    x = torch.randn(len(cond), *generator.latent_shape, generator=torch.Generator().manual_seed(seed))
    path = [x]
    for s in range(len(times) - 2):
        x, _ = generator.step_mean_std(x, float(times[s]), float(times[s + 1]), cond, 0.0)
        path.append(x)
    return path


@torch.no_grad()
def branch(generator, reward, layouts, cond, path, times, step: int, noise_level: float, branches: int,
           seed: int) -> dict:
    n = len(layouts)
    index = torch.arange(n).repeat_interleave(branches)
    x, cond = path[step][index], cond[index]
    mean, std = generator.step_mean_std(x, float(times[step]), float(times[step + 1]), cond, noise_level)
    x = gaussian_step(mean, std, x, generator=torch.Generator().manual_seed(seed + 1 + step)).prev_sample
    for s in range(step + 1, len(times) - 1):  # each branch finishes by the ODE
        x, _ = generator.step_mean_std(x, float(times[s]), float(times[s + 1]), cond, 0.0)
    out = reward(generator.space.decode(x), [layouts[i] for i in index.tolist()])
    info = out.info
    mask = info["instance_mask"].view(n, branches, -1)[:, 0]
    bins = [[size_bin(layout.boxes[j]) if j < layout.n else None for j in range(mask.shape[1])] for layout in layouts]
    in_bin = {name: torch.tensor([[b == name for b in row] for row in bins]) for name, _, _ in SIZE_BINS}
    return {
        "std": float(std.flatten()[0]),
        "isr": info["success"][info["instance_mask"]].float().mean().item(),
        "shape": differs(info["shape_ok"], n, branches, mask),
        "box": differs(info["iou"] >= 0.5, n, branches, mask),
        "success": differs(info["success"], n, branches, mask),
        "reward_std": out.rewards.view(n, branches).std(1).mean().item(),
        "shape_by_size": [differs(info["shape_ok"], n, branches, mask & in_bin[name]) for name, _, _ in SIZE_BINS],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-tiny", help="a registered generator name or a generator folder")
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[0.7, 0.1, 0.02],
                        help="SDE noise levels a of the branching step (policy.noise_level is 0.7)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="steps k to branch at (default: every one)")
    parser.add_argument("--num-steps", type=int, default=EnvConfig().num_steps, help="denoising steps per image")
    parser.add_argument("--layouts", type=int, default=100, help="layouts (spread evenly over the held-out levels)")
    parser.add_argument("--branches", type=int, default=4, help="independent draws of the branching step per layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else list(range(args.num_steps))
    if any(not 0 <= k < args.num_steps for k in steps):
        parser.error(f"--steps: each step must be in 0..{args.num_steps - 1}, got {steps}")
    if any(a <= 0 for a in args.noise_levels) or args.branches < 2 or args.layouts < 1:
        parser.error("--noise-levels must be > 0, --branches ≥ 2 and --layouts ≥ 1")
    try:
        generator = load_generator(args.model)
    except UserError as err:
        parser.error(str(err))
    generator.eval()
    reward = build_reward("shapes")
    held_out = EvalConfig()
    layouts = held_out_layouts(args.layouts, held_out.levels, held_out.seed)
    times = generator.sampler.times(args.num_steps)
    cond = generator.encode_layouts(layouts)
    path = ode_path(generator, cond, times, args.seed)
    print(f"{args.model}: {args.layouts} layouts (levels {held_out.levels}), {args.branches} branches each, "
          f"{args.num_steps} steps; 'differs': the verdict is not the same in every branch of a layout")
    sizes = " | ".join(f"shape differs, size {name}" for name, _, _ in SIZE_BINS)
    print("| a | step | t | noise std | ISR | shape differs | box differs | success differs | reward std in layout | "
          f"{sizes} |")
    print("|---" * (9 + len(SIZE_BINS)) + "|")
    rows = []
    for a in args.noise_levels:
        for k in tqdm(steps, desc=f"a={a:g}", leave=False):
            r = branch(generator, reward, layouts, cond, path, times, k, a, args.branches, args.seed)
            print(f"| {a:g} | {k} | {float(times[k]):.3f} | {r['std']:.3f} | {r['isr']:.3f} | {r['shape']:.3f} | "
                  f"{r['box']:.3f} | {r['success']:.3f} | {r['reward_std']:.4f} | "
                  + " | ".join(f"{v:.3f}" for v in r["shape_by_size"]) + " |", flush=True)
            rows.append({"noise_level": a, "step": k, "t": float(times[k]), **r,
                         "shape_by_size": dict(zip((name for name, _, _ in SIZE_BINS), r["shape_by_size"]))})
    write_json(args, __file__, layouts=len(layouts), levels=held_out.levels, eval_seed=held_out.seed, rows=rows)


if __name__ == "__main__":
    main()
