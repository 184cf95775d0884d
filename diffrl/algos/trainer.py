"""`diffrl train`: evaluate the base model, run RL iterations (rollout → update), evaluate again.

A run folder holds:
    config.yaml          the resolved configuration
    metrics.jsonl        one line per iteration (reward mean/std, losses, KL, clip fraction, seconds)
    tb/                  TensorBoard events: the same scalars (train/…), every evaluation's (eval/…: base at 0, final at
                         the last iteration, eval.every's between) and the pictures below
    checkpoints/         atomic safetensors checkpoints (weights, optimizer, RNGs, iteration)
    base.json            the base evaluation (and the wall time so far), what a resumed run reads
    samples_before.png   the first eval.grid held-out samples of the base model: target boxes drawn over, the prompt
                         under each, failed instances dashed with a red badge (`diffrl.eval.visualize`)
    samples_before.pt    those samples (uint8, tile-sized) and their verdicts, for before_after.png after a resume
    samples_after.png    the same layouts and noise after training
    before_after.png     the two side by side (base left, trained right) under each side's ISR and verdict counts
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

import json
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from diffrl.algos.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, remove_stale, restore_rng,
                                    save_checkpoint)
from diffrl.algos.forward import require_flow
from diffrl.algos.learner import require_idm
from diffrl.algos.replica import build_learner, learner_replica  # importing it registers every learner and the env
from diffrl.algos.sft import Paired
from diffrl.config import TrainConfig, chunk_layouts, http_options, save_yaml, uses_paired_data, uses_ray
from diffrl.distributed.learners import LearnerGroup
from diffrl.distributed.ray_workers import ScaleOut
from diffrl.envs.datasets import JsonlLayouts, make_source
from diffrl.errors import UserError
from diffrl.files import atomic_write_text
from diffrl.eval.data import EvalData, eval_data
from diffrl.eval.evaluate import evaluate
from diffrl.eval.visualize import RunPictures
from diffrl.policies.generator import LayoutGenerator, build_generator
from diffrl.policies.text import ConditionStore
from diffrl.registry import ALGOS, ENVS
from diffrl.rewards import Reward, build_reward
from diffrl.rewards.base import RewardUnavailable
from diffrl.rewards.guard import GuardedReward, is_unavailable


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.algo.name}-{datetime.now():%Y%m%d-%H%M%S}"


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
    """The run, step by step: build what it needs (checked before its folder is touched), start it (Ray, the folder,
    env, policy, learner), evaluate the base model (or load the checkpoint a resumed run continues from), iterate
    collect → update → log → checkpoint, evaluate the trained model. → the run folder."""
    started_run = time.time()
    folder = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if not resume and folder.exists() and any(folder.iterdir()):
        raise UserError(f"run folder {folder} is not empty: pass another --out, or --resume {folder} to continue it")
    parts = build(cfg)
    with ExitStack() as cleanup:
        run = start(cfg, folder, parts, cleanup, progress, started_run)
        run.begin(resume)
        run.iterate()
        return run.finish()


@dataclass
class _Parts:
    """What `build` makes before the run folder exists: every part a user's settings can get wrong."""

    device: torch.device
    source: object  # the training layouts (`diffrl.envs.datasets`)
    evaluation: EvalData  # eval.data's layouts, and what the --data file holds out for them
    reward: Reward | None  # None with --reward-workers: the reward actors score
    env_cls: type
    algo_cls: type
    generator: LayoutGenerator


def build(cfg: TrainConfig) -> _Parts:
    """Data, evaluation set, reward and generator; everything a user can get wrong is checked here, before the run
    folder is touched."""
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
    require_idm(cfg.joint, generator)
    require_flow(cfg.algo.name, generator)
    return _Parts(device, source, evaluation, reward, env_cls, algo_cls, generator)


def start(cfg: TrainConfig, folder: Path, parts: _Parts, cleanup: ExitStack, progress: bool,
          started_run: float) -> "_Run":
    """Ray (only when asked), the run folder with its config.yaml, the env, the policy and the learner."""
    scale = cleanup.enter_context(ScaleOut(cfg, parts.generator, parts.device)) if uses_ray(cfg) else None
    reward = parts.reward
    if scale is not None and scale.reward is not None:
        reward = scale.reward  # evaluations score on the reward actors too
    folder.mkdir(parents=True, exist_ok=True)
    cfg.out = str(folder)
    save_yaml(cfg, folder / "config.yaml")

    store = ConditionStore()
    phase = _Phase(f"train {cfg.algo.name}")
    guarded = GuardedReward(_Announced(reward, phase) if reward is not None else reward)
    env = parts.env_cls(
        parts.generator, guarded, parts.source, store,
        layouts_per_reset=cfg.env.layouts_per_iter, group_size=cfg.env.group_size,
        num_steps=cfg.env.num_steps, shift=cfg.env.shift, seed=cfg.seed, share_noise=cfg.env.share_noise,
        device=parts.device,
    )
    learner, actor = build_learner(cfg, parts.generator, store, env)
    if cfg.ray.learners > 1:  # the update on N Ray Train processes; rollouts and evaluation stay here
        learner = cleanup.enter_context(LearnerGroup(cfg, learner, parts.generator, store, learner_replica))
    if not parts.evaluation.default:  # the Shapes default stays quiet, as it always was
        _report(f"evaluating on {parts.evaluation.name}, judged by the reward {cfg.reward.name}")
    return _Run(cfg, folder, parts, reward, guarded, store, env, actor, learner, scale, phase, progress, started_run)


@dataclass
class _Run:
    """A started run: its parts, and what it measured so far (``base``, the wall time of earlier processes)."""

    cfg: TrainConfig
    folder: Path
    parts: _Parts
    reward: Reward | None  # the evaluations' scorer (the reward actors' with --reward-workers)
    guarded: GuardedReward  # the rollouts' scorer, counting samples whose reward failed
    store: ConditionStore
    env: object
    actor: object
    learner: object
    scale: ScaleOut | None
    phase: "_Phase"
    progress: bool
    started_run: float
    base: dict = field(default_factory=dict)
    wall_before: float = 0.0
    start_iteration: int = 0

    @property
    def generator(self) -> LayoutGenerator:
        return self.parts.generator

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @cached_property
    def writer(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.folder / "tb"))

    @cached_property
    def pictures(self) -> RunPictures:
        layouts = self.parts.evaluation.layouts
        return RunPictures(self.folder, layouts[: self.cfg.eval.grid], self.writer, len(layouts))

    def evaluate(self, desc: str):
        """→ (metrics, images, each instance's success [N, K] or None) of the generator now on the evaluation set;
        a GPU OOM names eval.batch_size."""
        cfg = self.cfg
        with oom_hint(f"in evaluation: lower eval.batch_size (now {cfg.eval.batch_size})"):
            return evaluate(self.generator, self.reward, self.parts.evaluation.layouts, desc=desc,
                            num_steps=cfg.env.num_steps, shift=cfg.env.shift, batch_size=cfg.eval.batch_size,
                            seed=cfg.eval.seed, progress=self.progress, verdicts=True)

    def begin(self, resume: bool) -> None:
        """Evaluate the base model, or, resuming, load the last checkpoint (weights, optimizer, RNGs) and the base
        evaluation, and drop the metric lines written after that checkpoint."""
        if resume and (latest := latest_checkpoint(self.checkpoints)) is not None:
            remove_stale(self.checkpoints)
            self.start_iteration, rng = load_checkpoint(latest, self.learner.trainable_modules(), self.learner.optimizer)
            self.learner.iteration = self.start_iteration  # NFT's soft update of v_old depends on it
            restore_rng(rng, self.env.noise_generator, self.parts.source, self.parts.device)
            self.base = json.loads((self.folder / "base.json").read_text())
            self.wall_before = self.base.pop("wall_seconds_so_far", 0.0)
        else:
            self.base, base_images, verdicts = self.evaluate("eval base")
            self.pictures.before(self.base, base_images, verdicts)  # kept in samples_before.pt for before_after.png
            atomic_write_text(self.folder / "base.json", json.dumps(self.base, indent=2) + "\n")
        if resume:
            _truncate_metrics(self.folder / "metrics.jsonl", self.start_iteration)

    def iterate(self) -> None:
        """The training iterations, each a line of metrics.jsonl and TensorBoard scalars."""
        cfg, writer = self.cfg, self.writer
        bar = tqdm(range(self.start_iteration, cfg.iterations), desc=f"train {cfg.algo.name}",
                   disable=not self.progress, initial=self.start_iteration, total=cfg.iterations)
        down = 0  # iterations in a row on which the reward could not be reached for any sample
        self.phase.bar = bar
        with open(self.folder / "metrics.jsonl", "a") as metrics_file:
            for iteration in bar:
                tic = time.time()
                rollout, out, errors, events, stats = self.collect(iteration)
                rollout_seconds = time.time() - tic
                rollout, rewards, valid = _drop_invalid(rollout, errors, events, iteration)
                logs = self.update(rollout, rewards)
                progress_eval = self.progress_eval(iteration)
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
                self.log(entry, metrics_file, writer, bar)
                self.checkpoint(iteration)
                down = down + 1 if _reward_down(errors, len(valid)) else 0
                if down >= cfg.reward.max_down_iterations:
                    raise UserError(f"iterations {iteration + 2 - down}–{iteration + 1}: the reward was unreachable on "
                                    f"every sample (reward.max_down_iterations={down}; {errors[0]}); bring it back and "
                                    f"continue with --resume {self.folder}")
        writer.flush()  # closed by finish, after the final evaluation's scalars and pictures

    def collect(self, iteration: int):
        """One iteration's rollouts with their rewards: in this process, or in chunks on Ray with the same layouts
        the env would draw. → (rollout [B, T], reward output, reward errors, events, scale-out stats)"""
        cfg, env = self.cfg, self.env
        self.phase("rollout")
        with oom_hint(f"while generating rollouts: lower env.layouts_per_iter (now {cfg.env.layouts_per_iter})"
                      + (f" or ray.chunk_layouts (now {chunk_layouts(cfg)})" if self.scale is not None else "")):
            if self.scale is None:
                with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
                    rollout = env.rollout(cfg.env.num_steps, self.actor, auto_reset=True)
                return rollout, env.last[2], self.guarded.take_errors(), [], {}
            layouts = self.parts.source.sample(cfg.env.layouts_per_iter)
            got = self.scale.collect(iteration, layouts)
            self.store.set(layouts, self.generator.encode_layouts(layouts).to(self.parts.device))
            return got.rollout.to(self.parts.device), got.reward, got.errors, got.events, got.stats

    def update(self, rollout, rewards) -> dict:
        """The learner's update on the valid samples (none left: skipped); → its logs."""
        cfg = self.cfg
        self.phase("update")
        with oom_hint(f"in the update: lower algo.minibatch_size (now {cfg.algo.minibatch_size}) or "
                      f"env.layouts_per_iter (now {cfg.env.layouts_per_iter})"):
            if not len(rewards):
                return {}
            return self.learner.update(rollout, paired_renders(self.generator, self.store) if uses_paired_data(cfg)
                                       else None)

    def progress_eval(self, iteration: int) -> dict:
        """With eval.every, an evaluation between iterations (not after the last: the final one follows)."""
        every, iterations = self.cfg.eval.every, self.cfg.iterations
        if not (every and (iteration + 1) % every == 0 and iteration + 1 < iterations):
            return {}
        eval_tic = time.time()
        metrics, images, verdicts = self.evaluate("eval")
        self.pictures.during(metrics, images, verdicts, iteration + 1)
        return {"eval_isr": metrics["isr"], "eval_miou": metrics["miou"], "eval_reward": metrics["reward"],
                "eval_seconds": time.time() - eval_tic}

    def log(self, entry: dict, metrics_file, writer, bar) -> None:
        """A line of metrics.jsonl (flushed), its events on stderr, its numbers in TensorBoard and on the bar."""
        metrics_file.write(json.dumps(entry) + "\n")
        metrics_file.flush()
        iteration = entry["iteration"]
        for event in entry.get("events", []):
            _report(f"iteration {iteration}: {event}")
        for key, value in entry.items():
            if key != "iteration" and isinstance(value, (int, float)):
                writer.add_scalar(f"train/{key}", value, iteration)
        if "reward_mean" in entry:
            bar.set_postfix(reward=f"{entry['reward_mean']:.3f}", kl=f"{entry.get('kl_ref', 0):.3g}")

    def checkpoint(self, iteration: int) -> None:
        """Every checkpoint_every iterations and after the last: weights, optimizer, RNGs; and base.json with the
        wall time so far, for a resumed run's total."""
        if (iteration + 1) % self.cfg.checkpoint_every == 0 or iteration + 1 == self.cfg.iterations:
            rng = capture_rng(self.env.noise_generator, self.parts.source, self.parts.device)
            if isinstance(self.learner, LearnerGroup):  # every learner writes its part (torch.distributed.checkpoint)
                self.learner.save_checkpoint(self.checkpoints, iteration + 1, rng)
            else:
                save_checkpoint(self.checkpoints, iteration + 1, self.learner.trainable_modules(),
                                self.learner.optimizer, rng)
            atomic_write_text(self.folder / "base.json", json.dumps(
                {**self.base, "wall_seconds_so_far": self.wall_before + time.time() - self.started_run},
                indent=2) + "\n")

    def finish(self) -> Path:
        """The final evaluation, its pictures (samples_after.png, before_after.png, TensorBoard) and summary.json.
        → the run folder."""
        try:
            final, final_images, verdicts = self.evaluate("eval final")
        except RewardUnavailable as err:
            raise UserError(f"final evaluation: {err}; the trained weights are saved: once the reward is back, "
                            f"--resume {self.folder} evaluates them and writes summary.json") from None
        if not self.pictures.after(self.base, final, final_images, verdicts, self.cfg.iterations) and self.cfg.eval.grid:
            _report("before_after.png not drawn: the base samples (samples_before.pt) were not kept by this run")
        self.writer.close()
        evaluation = self.parts.evaluation
        summary = {
            "base": self.base,
            "final": final,
            "iterations": self.cfg.iterations,
            "wall_seconds": self.wall_before + time.time() - self.started_run,  # plus earlier processes of a resume
            "eval_layouts": len(evaluation.layouts),
            "eval_data": evaluation.name,
            "held_out": evaluation.held_out,  # layouts of the --data file kept out of training for the evaluation
            "judge": f"reward {self.cfg.reward.name}",
        }
        atomic_write_text(self.folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        return self.folder


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
