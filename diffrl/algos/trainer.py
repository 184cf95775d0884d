"""`diffrl train`: evaluate the base model, run RL iterations (rollout → update), evaluate again.

A run folder holds:
    config.yaml          the resolved configuration
    metrics.jsonl        one line per iteration (reward mean/std, losses, KL, clip fraction, seconds)
    tb/                  TensorBoard events of the same scalars
    checkpoints/         atomic safetensors checkpoints (weights, optimizer, RNGs, iteration)
    samples_before.png   held-out samples of the base model, target boxes drawn over
    samples_after.png    the same layouts and noise after training
    summary.json         {"base": M, "final": M, "iterations", "wall_seconds", "eval_layouts", "eval_data",
                          "held_out", "judge"}; the evaluation set is ``eval.data``'s (`diffrl.eval.data`)

Rollouts run in this process (the default: `LayoutEnv.rollout` on the learner's generator, no Ray) or,
with ``--workers N`` / ``--reward-workers N``, in chunks on Ray actors (`diffrl.distributed.ray_workers`),
gathered in a fixed order into the same ``[B, T]`` rollout. Either way the reward is guarded
(`GuardedReward`): samples whose reward is NaN/inf or raised are counted (``invalid_samples``,
``reward_errors``), said in ``events`` and left out of the update. A reward that cannot be reached for any sample
of an iteration (a reward server down: `RewardUnavailable`) skips that update, and the run goes on, up to
``reward.max_down_iterations`` iterations in a row; any other reward that raises on every sample stops it.
Every file a resume reads is written atomically, so ``--resume`` after a SIGKILL at any moment continues from
the last complete checkpoint.
In one process with a fixed seed the continuation reproduces the uninterrupted run's metrics; bit for bit
with ``model.text_cache=0`` (a cached text embedding keeps the last bits of the batch it was first encoded
in, which a restarted process has not seen; with the cache, KL columns can differ in their last bits).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

import diffrl.algos.forward  # noqa: F401  (registers "awm", "nft")
import diffrl.algos.grpo  # noqa: F401  (registers "grpo")
import diffrl.algos.ppo  # noqa: F401  (registers "ppo")
import diffrl.algos.sft_learner  # noqa: F401  (registers "sft")
import diffrl.envs.layout_env  # noqa: F401  (registers "layout")
from diffrl.algos.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, remove_stale, restore_rng,
                                    save_checkpoint)
from diffrl.algos.forward import require_flow
from diffrl.algos.learner import require_idm
from diffrl.algos.replica import learner_replica
from diffrl.algos.sft import Paired
from diffrl.config import (TrainConfig, chunk_layouts, http_options, is_forward_learner, rollout_window, save_yaml,
                           uses_paired_data, uses_ray)
from diffrl.distributed.learners import LearnerGroup
from diffrl.distributed.ray_workers import ScaleOut
from diffrl.envs.datasets import JsonlLayouts, make_source
from diffrl.errors import UserError
from diffrl.files import atomic_write_text
from diffrl.eval.data import eval_data
from diffrl.eval.evaluate import evaluate
from diffrl.eval.visualize import save_grid
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import LayoutGenerator, build_generator
from diffrl.policies.lora import LoraReference, has_lora
from diffrl.policies.text import ConditionStore
from diffrl.registry import ALGOS, ENVS
from diffrl.rewards import Reward, build_reward
from diffrl.rewards.base import RewardUnavailable
from diffrl.rewards.guard import GuardedReward, is_unavailable


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.algo.name}-{datetime.now():%Y%m%d-%H%M%S}"


def frozen_copy(generator: LayoutGenerator) -> LayoutGenerator:
    """The reference policy π_ref: the initial denoiser, frozen (text encoder, latent space, sampler and guidance
    shared). With LoRA it is the policy's own backbone with LoRA off (`LoraReference`: no second backbone)."""
    if has_lora(generator.denoiser):
        denoiser = LoraReference(generator.denoiser).eval()
    else:
        denoiser = copy.deepcopy(generator.denoiser).requires_grad_(False).eval()
    return LayoutGenerator(denoiser, generator.text, generator.space, generator.sampler, generator.guidance_scale)


def paired_renders(generator: LayoutGenerator, store: ConditionStore) -> Paired:
    """The iteration's layouts (one row each, not one per group member) rendered by the Shapes world: I-DRUID's
    paired data for L_ldm, free here because the world can draw any layout exactly."""
    from diffrl.shapes.world import render

    images = render(store.layouts, size=generator.space.image_size).to(store.conditioning.boxes.device)
    return Paired(generator.space.encode(images), store.conditioning)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines written after the checkpoint a resumed run continues from (their work is redone),
    and a last line torn by a kill (no newline)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n") and line.strip()]
        atomic_write_text(path, "".join(line for line in lines if json.loads(line)["iteration"] <= iteration))


@contextmanager
def oom_hint(what: str):
    """A GPU out-of-memory error becomes one line naming the knob to lower."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise UserError(f"GPU out of memory {what}") from err


def _report(event: str) -> None:
    tqdm.write(f"diffrl: {event}", file=sys.stderr)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    started_run = time.time()
    run = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if not resume and run.exists() and any(run.iterdir()):
        raise UserError(f"run folder {run} is not empty: pass another --out, or --resume {run} to continue it")
    # Everything a user can get wrong is checked before the run folder is touched.
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.model.device)
    source = make_source(cfg.env.data, cfg.env.levels, seed=cfg.seed)
    evaluation = eval_data(cfg)  # eval.data: its layouts, and the --data file less what it holds out
    if evaluation.train_layouts is not None:
        source = JsonlLayouts(evaluation.train_layouts, seed=cfg.seed)
    reward = (build_reward(cfg.reward.name, cfg.reward.model or None, cfg.reward.options, http_options(cfg))
              if not cfg.ray.reward_workers else None)
    env_cls, algo_cls = ENVS.get(cfg.env.name), ALGOS.get(cfg.algo.name)
    with oom_hint(f"placing the generator on {device}: it needs a device with more free memory (--device)"):
        generator = build_generator(cfg.model, cfg.policy.train).to(device)
    require_idm(cfg.algo, generator)
    require_flow(cfg.algo.name, generator)
    with ExitStack() as cleanup:
        scale = cleanup.enter_context(ScaleOut(cfg, generator, device)) if uses_ray(cfg) else None  # Ray starts here only
        if scale is not None and scale.reward is not None:
            reward = scale.reward  # evaluations score on the reward actors too
        run.mkdir(parents=True, exist_ok=True)
        cfg.out = str(run)
        save_yaml(cfg, run / "config.yaml")

        store = ConditionStore()
        phase = _Phase(f"train {cfg.algo.name}")
        guarded = GuardedReward(_Announced(reward, phase) if reward is not None else reward)
        env = env_cls(
            generator, guarded, source, store,
            layouts_per_reset=cfg.env.layouts_per_iter, group_size=cfg.env.group_size,
            num_steps=cfg.env.num_steps, shift=cfg.env.shift, seed=cfg.seed, share_noise=cfg.env.share_noise,
            device=device,
        )
        policy = SDEPolicyNet(generator, store, cfg.policy.noise_level, *rollout_window(cfg))
        actor = make_actor(policy, env.action_spec, cfg.algo.log_prob_reduce)
        if is_forward_learner(cfg):  # AWM / NFT: the flow-matching loss on final samples, no actor to score
            learner = algo_cls(generator, frozen_copy(generator), store, cfg.algo, cfg.forward, env.sigmas)
        else:
            reference = SDEPolicyNet(frozen_copy(generator), store, cfg.policy.noise_level, *rollout_window(cfg))
            learner = algo_cls(policy, reference, actor, cfg.algo)
        if cfg.ray.learners > 1:  # the update on N Ray Train processes; rollouts and evaluation stay here
            learner = cleanup.enter_context(LearnerGroup(cfg, learner, generator, store, learner_replica))

        uses_pairs = uses_paired_data(cfg)
        eval_set = evaluation.layouts
        if not evaluation.default:  # the Shapes default stays quiet, as it always was
            _report(f"evaluating on {evaluation.name}, judged by the reward {cfg.reward.name}")
        eval_kwargs = dict(num_steps=cfg.env.num_steps, shift=cfg.env.shift, batch_size=cfg.eval.batch_size,
                           seed=cfg.eval.seed, progress=progress)
        eval_oom = f"in evaluation: lower eval.batch_size (now {cfg.eval.batch_size})"
        rollout_oom = (f"while generating rollouts: lower env.layouts_per_iter (now {cfg.env.layouts_per_iter})"
                       + (f" or ray.chunk_layouts (now {chunk_layouts(cfg)})" if scale is not None else ""))
        update_oom = (f"in the update: lower algo.minibatch_size (now {cfg.algo.minibatch_size}) or env.layouts_per_iter "
                      f"(now {cfg.env.layouts_per_iter})")
        start_iteration, wall_before = 0, 0.0
        checkpoints = run / "checkpoints"
        if resume and (latest := latest_checkpoint(checkpoints)) is not None:
            remove_stale(checkpoints)
            start_iteration, rng = load_checkpoint(latest, learner.trainable_modules(), learner.optimizer)
            learner.iteration = start_iteration  # NFT's soft update of v_old depends on it
            restore_rng(rng, env.noise_generator, source, device)
            base = json.loads((run / "base.json").read_text())
            wall_before = base.pop("wall_seconds_so_far", 0.0)
        else:
            with oom_hint(eval_oom):
                base, base_images = evaluate(generator, reward, eval_set, desc="eval base", **eval_kwargs)
            save_grid(run / "samples_before.png", base_images[: cfg.eval.grid], eval_set[: cfg.eval.grid])
            atomic_write_text(run / "base.json", json.dumps(base, indent=2) + "\n")
        if resume:
            _truncate_metrics(run / "metrics.jsonl", start_iteration)

        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"))
        bar = tqdm(range(start_iteration, cfg.iterations), desc=f"train {cfg.algo.name}", disable=not progress,
                   initial=start_iteration, total=cfg.iterations)
        down = 0  # iterations in a row on which the reward could not be reached for any sample
        phase.bar = bar
        with open(run / "metrics.jsonl", "a") as metrics_file:
            for iteration in bar:
                tic = time.time()
                phase("rollout")
                with oom_hint(rollout_oom):
                    if scale is None:
                        with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
                            rollout = env.rollout(cfg.env.num_steps, actor, auto_reset=True)
                        out, errors, events, stats = env.last[2], guarded.take_errors(), [], {}
                    else:  # the same layouts the env would draw, denoised in chunks on Ray
                        layouts = source.sample(cfg.env.layouts_per_iter)
                        got = scale.collect(iteration, layouts)
                        store.set(layouts, generator.encode_layouts(layouts).to(device))
                        rollout, out, errors, events, stats = got.rollout.to(device), got.reward, got.errors, got.events, got.stats
                rollout_seconds = time.time() - tic
                rollout, rewards, valid = _drop_invalid(rollout, errors, events, iteration)
                phase("update")
                with oom_hint(update_oom):
                    logs = learner.update(rollout, paired_renders(generator, store) if uses_pairs else None) if len(rewards) else {}
                progress_eval = {}
                if cfg.eval.every and (iteration + 1) % cfg.eval.every == 0 and iteration + 1 < cfg.iterations:
                    eval_tic = time.time()
                    with oom_hint(eval_oom):
                        metrics, _ = evaluate(generator, reward, eval_set, desc="eval", **eval_kwargs)
                    progress_eval = {"eval_isr": metrics["isr"], "eval_miou": metrics["miou"],
                                     "eval_reward": metrics["reward"], "eval_seconds": time.time() - eval_tic}
                entry = {
                    "iteration": iteration + 1,
                    **({"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())} if len(rewards) else {}),
                    **_reward_logs(out.info, valid.to(out.rewards.device)),
                    **logs,
                    "invalid_samples": int((~valid).sum()),
                    "reward_errors": len(errors),
                    **stats,
                    **progress_eval,
                    "rollout_seconds": rollout_seconds,
                    "seconds": time.time() - tic - progress_eval.get("eval_seconds", 0.0),  # training time only
                    **({"events": events} if events else {}),
                }
                metrics_file.write(json.dumps(entry) + "\n")
                metrics_file.flush()
                for event in events:
                    _report(f"iteration {iteration + 1}: {event}")
                for key, value in entry.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        writer.add_scalar(f"train/{key}", value, iteration + 1)
                if "reward_mean" in entry:
                    bar.set_postfix(reward=f"{entry['reward_mean']:.3f}", kl=f"{logs.get('kl_ref', 0):.3g}")
                if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.iterations:
                    rng = capture_rng(env.noise_generator, source, device)
                    if isinstance(learner, LearnerGroup):  # every learner writes its part (torch.distributed.checkpoint)
                        learner.save_checkpoint(checkpoints, iteration + 1, rng)
                    else:
                        save_checkpoint(checkpoints, iteration + 1, learner.trainable_modules(), learner.optimizer, rng)
                    atomic_write_text(run / "base.json", json.dumps(
                        {**base, "wall_seconds_so_far": wall_before + time.time() - started_run}, indent=2) + "\n")
                down = down + 1 if _reward_down(errors, len(valid)) else 0
                if down >= cfg.reward.max_down_iterations:
                    raise UserError(f"iterations {iteration + 2 - down}–{iteration + 1}: the reward was unreachable on "
                                    f"every sample (reward.max_down_iterations={down}; {errors[0]}); bring it back and "
                                    f"continue with --resume {run}")
        writer.close()

        with oom_hint(eval_oom):
            try:
                final, final_images = evaluate(generator, reward, eval_set, desc="eval final", **eval_kwargs)
            except RewardUnavailable as err:
                raise UserError(f"final evaluation: {err}; the trained weights are saved: once the reward is back, "
                                f"--resume {run} evaluates them and writes summary.json") from None
        save_grid(run / "samples_after.png", final_images[: cfg.eval.grid], eval_set[: cfg.eval.grid])
        summary = {
            "base": base,
            "final": final,
            "iterations": cfg.iterations,
            "wall_seconds": wall_before + time.time() - started_run,  # this process plus earlier ones of a resumed run
            "eval_layouts": len(eval_set),
            "eval_data": evaluation.name,
            "held_out": evaluation.held_out,  # layouts of the --data file kept out of training for the evaluation
            "judge": f"reward {cfg.reward.name}",
        }
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
        return run


class _Phase:
    """Names the part of an iteration running now (rollout, reward, update) in the train bar's description, so a
    bar that advances once a minute still shows it is alive."""

    def __init__(self, description: str):
        self.description, self.bar = description, None

    def __call__(self, name: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_description(f"{self.description} · {name}", refresh=True)


class _Announced(Reward):
    """``reward`` unchanged, telling the bar when it runs (the last denoising step of a rollout)."""

    def __init__(self, reward: Reward, phase: _Phase):
        self.reward, self.phase, self.name = reward, phase, getattr(reward, "name", "reward")

    def __call__(self, images, layouts):
        self.phase("reward")
        return self.reward(images, layouts)


def _drop_invalid(rollout, errors: list[str], events: list[str], iteration: int):
    """Leave out of the update the samples whose reward is NaN/inf (the guard's mark for a reward that raised).
    → (rollout [B', T], rewards [B'], valid [B] bool); what was dropped is said in ``events``."""
    rewards = rollout["next", "reward"][:, -1, 0]  # [B] terminal rewards
    valid = torch.isfinite(rewards)
    invalid = int((~valid).sum())
    if errors:
        if len(errors) == len(valid) and not _reward_down(errors, len(valid)):  # the reward itself is broken
            raise RuntimeError(f"the reward raised on every sample of iteration {iteration + 1}: {errors[0]}")
        events.append(f"the reward raised on {len(errors)} sample(s), left out of the update: {errors[0]}")
    if invalid > len(errors):
        events.append(f"{invalid - len(errors)} sample(s) got a NaN/inf reward, left out of the update")
    if not invalid:
        return rollout, rewards, valid  # untouched: the same tensors as before any of this existed
    if invalid == len(valid):
        events.append("no sample left to learn from: this iteration's update was skipped")
    return rollout[valid], rewards[valid], valid


def _reward_down(errors: list[str], samples: int) -> bool:
    """Could the reward not be reached for any of the iteration's samples (its server down: `RewardUnavailable`)?
    Such an iteration skips its update and the run goes on, up to ``reward.max_down_iterations`` in a row."""
    return len(errors) == samples and all(is_unavailable(line) for line in errors)


def _reward_logs(info: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, float]:
    """Train ISR and each composite part's mean, over the samples that count (``valid`` [B])."""
    rows = (lambda v: v) if bool(valid.all()) else (lambda v: v[valid])
    logs = {}
    if "success" in info and "instance_mask" in info:  # a reward with per-image scores only has no train ISR
        logs["train_isr"] = float(rows(info["success"])[rows(info["instance_mask"])].float().mean())
    logs.update({f"reward/{k[5:]}": float(rows(v).float().mean()) for k, v in info.items() if k.startswith("part/")})
    return logs
