"""Where did a run's update help, and where did it hurt? Its weights inside the RL window, the base model's after.

    python experiments/window_split.py RUN [--threads 2] [--json PATH]

RL explores and trains only the first ``policy.window`` of the denoising steps; the later steps are the
deterministic ODE step, and no loss holds them in place, yet they run on the same (updated) weights. This samples
the run's held-out set (its ``eval.*`` settings, so the first and last rows are its summary's base and final) four
ways: every step with the base weights, every step with the run's last checkpoint, and the two mixtures split at
the window's end (`diffrl.eval.split`). A trained row that gains inside the window while the whole run loses
means the update's spill-over into the later steps is what costs the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffrl.algos.export import load_run
from diffrl.config import window_first_step, window_steps
from diffrl.errors import UserError
from diffrl.eval.evaluate import evaluate, held_out_layouts
from diffrl.eval.split import split_generator, window_boundary
from diffrl.policies.generator import build_generator
from diffrl.rewards import build_reward

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of `diffrl train` (config.yaml + checkpoints/)")
    parser.add_argument("--threads", type=int, default=2)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        cfg, trained = load_run(args.run)
    except UserError as err:
        parser.error(str(err))  # one line on stderr, exit code 2
    window = window_steps(cfg)
    if window_first_step(cfg):
        parser.error(f"{args.run}: its RL window opens at step {window_first_step(cfg)} (policy.window_start); this "
                     "script splits where a window that opens at the first step ends")
    try:
        boundary = window_boundary(trained.sampler, cfg.env.num_steps, window, cfg.env.shift)
    except ValueError as err:
        parser.error(f"{args.run}: {err}")
    base = build_generator(cfg.model, cfg.policy.train)  # the same model with the weights the run started from
    reward = build_reward(cfg.reward.name, cfg.reward.model or None)
    layouts = held_out_layouts(cfg.eval.layouts, cfg.eval.levels, cfg.eval.seed)
    kwargs = dict(num_steps=cfg.env.num_steps, shift=cfg.env.shift, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
    rows = [("base", "base", base.denoiser, base.denoiser), ("trained", "base", trained.denoiser, base.denoiser),
            ("base", "trained", base.denoiser, trained.denoiser), ("trained", "trained", trained.denoiser, trained.denoiser)]
    print(f"{args.run}: window = first {window} of {cfg.env.num_steps} steps (flow times above {boundary:.3f}); "
          f"{len(layouts)} held-out layouts")
    print("| window steps | later steps | ISR | mIoU | reward | ok / missed / wrong box / wrong attribute |")
    print("|---|---|---|---|---|---|")
    table = []
    for early_name, late_name, early, late in rows:
        m, _ = evaluate(split_generator(base, early, late, boundary), reward, layouts, desc=f"{early_name}/{late_name}",
                        **kwargs)
        counts = " / ".join(str(v) for v in m["verdicts"].values())
        print(f"| {early_name} | {late_name} | {m['isr']:.3f} | {m['miou']:.3f} | {m['reward']:.3f} | {counts} |",
              flush=True)
        table.append({"window_steps": early_name, "later_steps": late_name, "isr": m["isr"], "miou": m["miou"],
                      "reward": m["reward"], "verdicts": m["verdicts"]})
    write_json(args, __file__, window=window, num_steps=cfg.env.num_steps, boundary=boundary, layouts=len(layouts),
               rows=table)


if __name__ == "__main__":
    main()
