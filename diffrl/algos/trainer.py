"""`diffrl train`: evaluate the base model, run RL iterations (rollout → update), evaluate again.

A run folder holds:
    config.yaml          the resolved configuration
    metrics.jsonl        one line per iteration (reward mean/std, losses, KL, clip fraction, seconds)
    tb/                  TensorBoard events of the same scalars
    checkpoints/         atomic safetensors checkpoints (weights, optimizer, RNGs, iteration)
    samples_before.png   held-out samples of the base model, target boxes drawn over
    samples_after.png    the same layouts and noise after training
    summary.json         {"base": M, "final": M, "iterations", "wall_seconds", "eval_layouts"}
"""

from __future__ import annotations

import copy
import json
import time
from datetime import datetime
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

import diffrl.algos.grpo  # noqa: F401  (registers "grpo")
import diffrl.algos.ppo  # noqa: F401  (registers "ppo")
import diffrl.algos.sft_learner  # noqa: F401  (registers "sft")
import diffrl.envs.layout_env  # noqa: F401  (registers "layout")
from diffrl.algos.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffrl.algos.sft import Paired
from diffrl.config import TrainConfig, save_yaml, window_steps
from diffrl.envs.datasets import make_source
from diffrl.errors import UserError
from diffrl.eval.evaluate import evaluate, held_out_layouts
from diffrl.eval.visualize import save_grid
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import LayoutGenerator, load_generator
from diffrl.policies.text import ConditionStore
from diffrl.registry import ALGOS, ENVS
from diffrl.rewards import build_reward


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.algo.name}-{datetime.now():%Y%m%d-%H%M%S}"


def frozen_copy(generator: LayoutGenerator) -> LayoutGenerator:
    """The reference policy π_ref: the initial denoiser, frozen (the text encoder is shared)."""
    denoiser = copy.deepcopy(generator.denoiser).requires_grad_(False).eval()
    return LayoutGenerator(denoiser, generator.text, generator.space)


def paired_renders(generator: LayoutGenerator, store: ConditionStore) -> Paired:
    """The iteration's layouts (one row each, not one per group member) rendered by the Shapes world: I-DRUID's
    paired data for L_ldm, free here because the world can draw any layout exactly."""
    from diffrl.shapes.world import render

    images = render(store.layouts, size=generator.space.size).to(store.conditioning.boxes.device)
    return Paired(generator.space.encode(images), store.conditioning)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines written after the checkpoint a resumed run continues from (their work is redone),
    and a last line torn by a kill (no newline)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n") and line.strip()]
        path.write_text("".join(line for line in lines if json.loads(line)["iteration"] <= iteration))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    started_run = time.time()
    run = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if not resume and run.exists() and any(run.iterdir()):
        raise UserError(f"run folder {run} is not empty: pass another --out, or --resume {run} to continue it")
    # Everything a user can get wrong is checked before the run folder is touched.
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.model.device)
    source = make_source(cfg.env.data, cfg.env.levels, seed=cfg.seed)
    reward = build_reward(cfg.reward.name, cfg.reward.model or None)
    env_cls, algo_cls = ENVS.get(cfg.env.name), ALGOS.get(cfg.algo.name)
    generator = load_generator(cfg.model.name).to(device)
    if cfg.policy.train == "adapter":
        generator.denoiser.transformer.requires_grad_(False)
    run.mkdir(parents=True, exist_ok=True)
    cfg.out = str(run)
    save_yaml(cfg, run / "config.yaml")

    store = ConditionStore()
    env = env_cls(
        generator, reward, source, store,
        layouts_per_reset=cfg.env.layouts_per_iter, group_size=cfg.env.group_size,
        num_steps=cfg.env.num_steps, shift=cfg.env.shift, seed=cfg.seed, device=device,
    )
    window = window_steps(cfg)
    policy = SDEPolicyNet(generator, store, cfg.policy.noise_level, window)
    reference = SDEPolicyNet(frozen_copy(generator), store, cfg.policy.noise_level, window)
    actor = make_actor(policy, env.action_spec, cfg.algo.log_prob_reduce)
    learner = algo_cls(policy, reference, actor, cfg.algo)

    uses_pairs = cfg.algo.ldm_coef > 0 or cfg.algo.name == "sft"
    eval_set = held_out_layouts(cfg.eval.layouts, cfg.eval.levels, cfg.eval.seed)
    eval_kwargs = dict(num_steps=cfg.env.num_steps, shift=cfg.env.shift, batch_size=cfg.eval.batch_size,
                       seed=cfg.eval.seed, progress=progress)
    start_iteration, wall_before = 0, 0.0
    checkpoints = run / "checkpoints"
    if resume and (latest := latest_checkpoint(checkpoints)) is not None:
        start_iteration, rng = load_checkpoint(latest, learner.trainable_modules(), learner.optimizer)
        torch.set_rng_state(rng["torch"])
        env.noise_generator.set_state(rng["env_noise"])
        source.load_state_dict({"generator": rng["data"]})
        base = json.loads((run / "base.json").read_text())
        wall_before = base.pop("wall_seconds_so_far", 0.0)
        _truncate_metrics(run / "metrics.jsonl", start_iteration)
    else:
        base, base_images = evaluate(generator, reward, eval_set, desc="eval base", **eval_kwargs)
        save_grid(run / "samples_before.png", base_images[: cfg.eval.grid], eval_set[: cfg.eval.grid])
        (run / "base.json").write_text(json.dumps(base, indent=2) + "\n")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tb"))
    bar = tqdm(range(start_iteration, cfg.iterations), desc=f"train {cfg.algo.name}", disable=not progress,
               initial=start_iteration, total=cfg.iterations)
    with open(run / "metrics.jsonl", "a") as metrics_file:
        for iteration in bar:
            tic = time.time()
            with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
                rollout = env.rollout(cfg.env.num_steps, actor, auto_reset=True)
            rollout_seconds = time.time() - tic
            logs = learner.update(rollout, paired_renders(generator, store) if uses_pairs else None)
            rewards = rollout["next", "reward"][:, -1, 0]
            info = env.last[2].info
            entry = {
                "iteration": iteration + 1,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                **({"train_isr": float(info["success"][info["instance_mask"]].float().mean())} if "success" in info else {}),
                **{f"reward/{k[5:]}": float(v.float().mean()) for k, v in info.items() if k.startswith("part/")},
                **logs,
                "rollout_seconds": rollout_seconds,
                "seconds": time.time() - tic,
            }
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()
            for key, value in entry.items():
                if key != "iteration":
                    writer.add_scalar(f"train/{key}", value, iteration + 1)
            bar.set_postfix(reward=f"{entry['reward_mean']:.3f}", kl=f"{logs.get('kl_ref', 0):.3g}")
            if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.iterations:
                rng = {"torch": torch.get_rng_state(), "env_noise": env.noise_generator.get_state()}
                if hasattr(source, "state_dict"):
                    rng["data"] = source.state_dict()["generator"]
                save_checkpoint(checkpoints, iteration + 1, learner.trainable_modules(), learner.optimizer, rng)
                (run / "base.json").write_text(
                    json.dumps({**base, "wall_seconds_so_far": wall_before + time.time() - started_run}, indent=2) + "\n"
                )
    writer.close()

    final, final_images = evaluate(generator, reward, eval_set, desc="eval final", **eval_kwargs)
    save_grid(run / "samples_after.png", final_images[: cfg.eval.grid], eval_set[: cfg.eval.grid])
    summary = {
        "base": base,
        "final": final,
        "iterations": cfg.iterations,
        "wall_seconds": wall_before + time.time() - started_run,  # this process plus earlier ones of a resumed run
        "eval_layouts": len(eval_set),
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run
