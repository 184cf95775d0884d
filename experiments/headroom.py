"""How far can the shipped model move in the time a default run trains? A supervised upper bound for RL.

    python experiments/headroom.py [--seconds 480] [--lrs 1e-4 3e-4 1e-3] [--targets exact own-best]
                                  [--window 0.2] [--train-levels 1 2 3] [--plot docs/headroom.png] [--json PATH]

Each configuration starts from the shipped model and trains it by plain flow matching
(`diffrl.algos.sft.flow_matching_loss`) for ``--seconds`` of training time — about what `diffrl train` has
left for its 30 iterations after its two evaluations — with Adam, batch ``--batch`` (64), gradient-norm
clip 1, on fresh layouts every step (L2–L6, or ``--train-levels``). Every ``--eval-every`` steps (evaluation time not counted) it
scores the same 250 held-out L2–L6 layouts as `diffrl train`'s summary, by deterministic ODE sampling.

``--targets``:
  exact     the Shapes world's exact renders of each layout: paired data RL never sees. No learner that
            only gets a scalar reward for its own samples can expect to beat this in the same time.
  own-best  the model's own ODE samples, ``--group`` (4) per layout, keeping the highest-reward one of
            each layout: reward-filtered self-distillation (RAFT-style), another way to learn from a reward.

``--window F`` trains only at the flow times of the first F of the ``--num-steps`` steps — RL's window
(`policy.window`), whose steps are the only ones an RL update is meant to change — and scores each evaluation
twice: as trained, and with the base weights on every step after the window (`diffrl.eval.split`), which is
what a learner confined to the window can gain there.

``--train-levels 1 2 3`` draws the training layouts from the shipped model's own pre-training levels instead of
the held-out L2–L6 (the evaluation set is unchanged): whether more of its own pre-training still moves held-out
ISR, that is, whether the shipped model is a converged starting point rather than a weakened one.

Not the headroom of `experiments/best_of_n.py`, which trains nothing: that one samples the model N times per layout
and measures how much better its best sample already is (what a learner could reach by making the reward's favourite
likely); this one changes the weights by supervised training and measures how far they move in a run's time.

Prints one line per evaluation and a table of the best and last ISR per configuration; ``--plot`` draws
ISR against training seconds (matplotlib, from the ``sweep`` extra).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from diffrl.algos.sft import flow_matching_loss
from diffrl.config import EvalConfig, window_step_count
from diffrl.eval.evaluate import evaluate, held_out_layouts
from diffrl.eval.split import split_generator, window_boundary
from diffrl.policies.generator import load_generator
from diffrl.rewards import ShapesReward
from diffrl.shapes.world import LEVELS, render, sample_layouts

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)

SUMMARY = EvalConfig()  # `diffrl train`'s held-out summary set: its eval.* defaults


@torch.no_grad()
def own_best(generator, reward, layouts, group: int, num_steps: int, rng: torch.Generator) -> torch.Tensor:
    """The highest-reward of ``group`` ODE samples per layout → latents [len(layouts), C, H, W]."""
    index = torch.arange(len(layouts)).repeat_interleave(group)
    cond = generator.encode_layouts(layouts)[index]
    times = generator.sampler.times(num_steps, 0.0)
    x = torch.randn(len(index), *generator.latent_shape, generator=rng)
    for s in range(num_steps):
        x, _ = generator.step_mean_std(x, float(times[s]), float(times[s + 1]), cond, 0.0)
    scores = reward(generator.space.decode(x), [layouts[i] for i in index.tolist()]).rewards.view(len(layouts), group)
    best = scores.argmax(1) + torch.arange(len(layouts)) * group
    return x[best]


def run(model: str, targets: str, lr: float, args, eval_set, reward) -> list[tuple[float, int, float, float, float]]:
    """→ [(training seconds, step, ISR, mIoU, ISR with the base weights after the window (nan without
    --window))], starting with the model as shipped at 0 s."""
    torch.manual_seed(args.seed)
    generator = load_generator(model)
    params = [p for p in generator.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(args.seed)
    evaluate_kw = dict(num_steps=args.num_steps, batch_size=125, progress=False)
    if args.window:
        base = copy.deepcopy(generator.denoiser).eval().requires_grad_(False)

    def score(seconds: float, step: int) -> tuple[float, int, float, float, float]:
        m, _ = evaluate(generator, reward, eval_set, **evaluate_kw)
        windowed = float("nan")
        if args.window:
            split = split_generator(generator, generator.denoiser, base, args.boundary)
            windowed = evaluate(split, reward, eval_set, **evaluate_kw)[0]["isr"]
        print(f"   {targets:8s} lr {lr:.0e}  {seconds:6.0f} s  step {step:5d}  ISR {m['isr']:.3f}  mIoU {m['miou']:.3f}"
              + (f"  ISR, base after the window {windowed:.3f}" if args.window else ""), flush=True)
        return seconds, step, m["isr"], m["miou"], windowed

    curve = [score(0.0, 0)]
    trained, step = 0.0, 0
    while trained < args.seconds:
        tic = time.time()
        layouts = sample_layouts(args.batch, args.train_levels, seed=args.seed * 1_000_003 + step)
        if targets == "exact":
            x0 = generator.space.encode(render(layouts, size=generator.space.image_size))
        else:
            x0 = own_best(generator, reward, layouts, args.group, args.num_steps, rng)
        t = args.boundary + (1 - args.boundary) * torch.rand(len(layouts), generator=rng) if args.window else None
        loss = flow_matching_loss(generator, x0, generator.encode_layouts(layouts), rng, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        trained += time.time() - tic
        if step % args.eval_every == 0 or trained >= args.seconds:
            curve.append(score(trained, step))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--seconds", type=float, default=480.0, help="training seconds per configuration")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--targets", nargs="+", choices=["exact", "own-best"], default=["exact", "own-best"])
    parser.add_argument("--batch", type=int, default=64, help="layouts per step")
    parser.add_argument("--group", type=int, default=4, help="own-best: samples per layout to choose from")
    parser.add_argument("--num-steps", type=int, default=10, help="denoising steps of evaluation and own samples")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--window", type=float, default=0.0,
                        help="train only at the flow times of this first fraction of the steps (RL's window); 0: all")
    parser.add_argument("--train-levels", type=int, nargs="+", default=SUMMARY.levels, choices=LEVELS, metavar="L",
                        help="Shapes levels of the training layouts (default: the held-out set's, 2–6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default="", help="write ISR against training seconds to this PNG")
    add_json_option(parser, __file__)
    args = parser.parse_args()
    if args.window < 0:
        parser.error(f"--window {args.window:g}: a fraction of the steps, 0 (off) or more")
    if args.window:  # the flow time that ends the window, from the model's own schedule
        try:
            args.boundary = window_boundary(load_generator(args.model).sampler, args.num_steps,
                                            window_step_count(args.window, args.num_steps))
        except ValueError as err:
            parser.error(f"--window {args.window:g}: {err}")
    torch.set_num_threads(args.threads)
    reward = ShapesReward()
    eval_set = held_out_layouts(SUMMARY.layouts, SUMMARY.levels, SUMMARY.seed)
    curves = {}
    for targets in args.targets:
        for lr in args.lrs:
            curves[(targets, lr)] = run(args.model, targets, lr, args, eval_set, reward)

    base = next(iter(curves.values()))[0][2]
    print(f"\nheld-out ISR after {args.seconds:.0f} s of training (base {base:.3f}, {args.threads} threads)")
    where = f" (trained at the first {args.window:g} of the steps only)" if args.window else ""
    if args.train_levels != SUMMARY.levels:
        where += f" (trained on L{', L'.join(map(str, args.train_levels))} layouts)"
    extra = ("| last ISR, base after the window ", "|---") if args.window else ("", "")
    print(f"| targets{where} | lr | steps | best ISR (at s) | last ISR | Δ last {extra[0]}|")
    print(f"|---|---|---|---|---|---{extra[1]}|")
    for (targets, lr), curve in curves.items():
        best = max(curve, key=lambda row: row[2])
        last = curve[-1]
        tail = f" {last[4]:.3f} |" if args.window else ""
        print(f"| {targets} | {lr:.0e} | {last[1]} | {best[2]:.3f} ({best[0]:.0f}) | {last[2]:.3f} | {last[2] - base:+.3f} |{tail}")
    fields = ("seconds", "step", "isr", "miou", "isr_base_after_window")
    write_json(args, __file__, base_isr=base, configurations=[
        {"targets": targets, "lr": lr, "steps": curve[-1][1], "best_isr": max(row[2] for row in curve),
         "best_at_seconds": max(curve, key=lambda row: row[2])[0], "last_isr": curve[-1][2],
         "delta_last": curve[-1][2] - base, "curve": [dict(zip(fields, row)) for row in curve]}
        for (targets, lr), curve in curves.items()])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for (targets, lr), curve in curves.items():
            ax.plot([r[0] for r in curve], [r[2] for r in curve], marker="o", ms=3,
                    ls="-" if targets == "exact" else "--", label=f"{targets}, lr {lr:.0e}")
        ax.axhline(base + 0.08, color="grey", lw=0.8, ls=":", label="base + 0.08 (issue 2's target)")
        ax.set_xlabel("training seconds (2 CPU cores)")
        ax.set_ylabel("held-out ISR (250 L2–L6 layouts)")
        ax.set_title("Flow matching from the shipped model")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
