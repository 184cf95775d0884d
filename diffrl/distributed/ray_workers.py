"""Rollouts and rewards on Ray: an iteration cut into chunks, each denoised wherever there is room, gathered
in chunk order.

**Chunks.** The driver draws the iteration's layouts from the run's one data source and cuts them into
chunks of ``ray.chunk_layouts`` layouts (× ``env.group_size`` samples, so a GRPO group never straddles
two chunks). A chunk carries its layouts and a seed made from (run seed, iteration, chunk index) alone.
What a chunk produces therefore depends on the policy weights, its layouts and its seed — not on which
worker ran it, nor when, nor whether it ran twice: a run is reproducible for a seed and chunk size
(whatever the worker count, on identical hardware), and a chunk lost with its worker is collected again
without changing the run. Chunks are assembled in index order, each sample's ``layout_index`` shifted to
its row in the iteration, so the learner sees one ``[B, T]`` rollout and one `ConditionStore` holding
every chunk's layouts, as with in-process rollouts.

**Where chunks run** (`ScaleOut` picks; ``--workers 0 --reward-workers 0`` uses none of this module):
- `RolloutPool` (``--workers N``): N `RolloutWorker` actors, each a policy replica with its env (and its
  reward unless reward workers score). Before each iteration the trainable parameters go into the object
  store once (one ``ray.put``) and every worker copies them from there; frozen weights never travel.
  Each worker has two chunks queued, so it never waits for the driver between chunks.
- `LocalRollouts` (``--workers 0 --reward-workers R``): chunks denoised one after another in this
  process, on the learner's own generator.
- ``--reward-workers R`` with either: chunk i's images go to a reward actor (`RemoteReward`) through the
  object store as soon as chunk i is denoised and are scored while chunks i+1… denoise (DDPO's
  asynchronous reward); the driver only waits for the scores still missing after the last chunk.

**Faults.** A worker whose actor dies (process killed, node lost, Ray's memory monitor) is replaced by a
fresh actor that first loads the current weights from the object store; the chunks it held go back to
the queue. A worker that hangs — no result for a chunk within ``ray.chunk_timeout`` seconds of handing it
over — is killed and replaced the same way. A reward actor is replaced the same way and rescores its batch. Each replacement is an
`events` line the trainer writes to ``metrics.jsonl``; a chunk that loses its worker more than
``ray.max_restarts`` times stops the run. A reward that raises or returns NaN/inf for some samples is
handled by `GuardedReward` wherever the reward runs (those samples get a NaN reward, the trainer drops
them). A GPU out-of-memory error inside an actor reaches the trainer as itself, which names the knob.

Ray is imported inside functions only; importing this module starts nothing.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.config import TrainConfig, chunk_layouts, http_options, is_forward_learner, rollout_window
from diffrl.envs.layout_env import LayoutEnv
from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import LayoutGenerator, build_generator
from diffrl.policies.text import ConditionStore
from diffrl.rewards.base import Reward, RewardOutput
from diffrl.rewards.compose import build_reward
from diffrl.rewards.guard import GuardedReward, cat_outputs
from diffrl.rewards.remote import RemoteReward, Ticket, first_line, lost_errors, unwrap

QUEUE_DEPTH = 2  # chunks queued on each rollout worker


# ---------------------------------------------------------------------------------------------- chunks

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def chunk_seed(seed: int, iteration: int, index: int) -> int:
    """A 63-bit seed from (run seed, iteration, chunk index) alone (SplitMix64 chained over the three)."""
    x = 0
    for value in (seed, iteration, index):
        x = _splitmix64(x ^ (value & MASK64))
    return x >> 1


@dataclass
class Chunk:
    index: int  # position in the iteration
    first: int  # row of its first layout among the iteration's layouts
    layouts: list[Layout]  # its distinct layouts (each sampled group_size times)
    group_size: int
    seed: int  # seeds the initial noise; seed + 1 the policy's sampling noise

    @property
    def sample_layouts(self) -> list[Layout]:
        """The layout of each of its samples, in the env's order (layout-major)."""
        return [layout for layout in self.layouts for _ in range(self.group_size)]


def make_chunks(layouts: Sequence[Layout], group_size: int, size: int, seed: int, iteration: int) -> list[Chunk]:
    """An iteration's layouts → chunks of ``size`` layouts (the last one may be smaller)."""
    return [Chunk(i, first, list(layouts[first : first + size]), group_size, chunk_seed(seed, iteration, i))
            for i, first in enumerate(range(0, len(layouts), size))]


# ------------------------------------------------------------------------------------------- a worker

class GivenLayouts:
    """A layout source that hands out the layouts it was last given (a chunk's)."""

    def __init__(self) -> None:
        self.layouts: list[Layout] = []

    def sample(self, n: int) -> list[Layout]:
        if n != len(self.layouts):
            raise RuntimeError(f"the env asked for {n} layouts, the chunk holds {len(self.layouts)}")
        return self.layouts


class Deferred(Reward):
    """Scores nothing (0): the images are scored elsewhere and the rewards filled in afterwards."""

    name = "deferred"

    def __call__(self, images, layouts) -> RewardOutput:
        return RewardOutput(torch.zeros(images.shape[0], device=images.device))


@dataclass
class ChunkResult:
    index: int
    rollout: TensorDictBase  # [b, T] on the CPU, layout_index local to the chunk
    reward: RewardOutput | None  # None when the images went to reward actors
    errors: list[str]  # per-sample reward error lines
    start: float  # wall-clock seconds the denoising started and ended
    end: float


class RolloutWorker:
    """A policy replica with its envs, denoising chunks. A plain class: `RolloutPool` wraps it as a Ray
    actor (its own generator, loaded from ``model.name``); `LocalRollouts` uses it in this process on the
    learner's generator. ``reward_factory`` None: the images are returned for reward actors to score."""

    def __init__(self, cfg: TrainConfig, *, reward_factory: Callable[[], Reward] | None = None,
                 generator: LayoutGenerator | None = None, device: str = "cpu", threads: int | None = None):
        self.error: BaseException | None = None
        try:
            if threads:
                torch.set_num_threads(threads)
            self.cfg = cfg
            self.device = torch.device(device)
            if generator is None:
                # the learner's recipe (LoRA included), so the trainable parameters' names match the driver's
                generator = build_generator(cfg.model, cfg.policy.train).to(self.device)
                generator.denoiser.requires_grad_(False)
            self.generator = generator
            self.reward = GuardedReward(reward_factory()) if reward_factory is not None else None
            self.store = ConditionStore()
            self.policy = SDEPolicyNet(generator, self.store, cfg.policy.noise_level, *rollout_window(cfg))
            self.envs: dict[int, tuple[LayoutEnv, Any]] = {}
            self.version = 0
        except Exception as err:  # noqa: BLE001  (raised again by ready(), so the driver sees the cause)
            self.error = err

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return os.getpid()

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Copy the learner's trainable parameters (name → tensor) into this replica."""
        params = dict(self.generator.denoiser.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise KeyError(f"weights for parameters this replica lacks: {unknown[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.version = version

    def _env(self, layouts: int):
        if layouts not in self.envs:
            cfg = self.cfg
            env = LayoutEnv(self.generator, self.reward or Deferred(), GivenLayouts(), self.store,
                            layouts_per_reset=layouts, group_size=cfg.env.group_size, num_steps=cfg.env.num_steps,
                            shift=cfg.env.shift, share_noise=cfg.env.share_noise, device=self.device)
            self.envs[layouts] = env, make_actor(self.policy, env.action_spec, cfg.pg.log_prob_reduce)
        return self.envs[layouts]

    def collect(self, chunk: Chunk, version: int | None = None) -> tuple[ChunkResult, torch.Tensor | None]:
        """Denoise one chunk → (its result, its images [b, 3, H, W] when they are to be scored elsewhere)."""
        if version is not None and version != self.version:
            raise RuntimeError(f"rollout worker holds weights v{self.version}, the driver sent v{version}")
        env, actor = self._env(len(chunk.layouts))
        env.source.layouts = chunk.layouts
        env.noise_generator.manual_seed(chunk.seed)
        start = time.time()
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        # fork_rng: in the driver's process the global RNG (the learner's) is left as it was
        with torch.random.fork_rng(devices=cuda), set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
            torch.manual_seed(chunk.seed + 1)
            rollout = env.rollout(self.cfg.env.num_steps, actor, auto_reset=True)
        images, _, out = env.last
        reward, errors = None, []
        if self.reward is not None:
            reward = RewardOutput(out.rewards.float().cpu(), {k: v.cpu() for k, v in out.info.items()})
            errors = self.reward.take_errors()
        if is_forward_learner(self.cfg):  # AWM / NFT learn from the final samples: send the last step only
            rollout = final_step(rollout)
        result = ChunkResult(chunk.index, rollout.cpu(), reward, errors, start, time.time())
        return result, (images.cpu() if self.reward is None else None)


def final_step(rollout: TensorDictBase) -> TensorDictBase:
    """A [b, T] rollout → [b, 1]: the last step's layout index and what followed it (the final latent and the
    reward), all a forward-process learner (`diffrl.algos.forward.FinalSamples`) reads."""
    return rollout[:, -1:].select("layout_index", ("next", "latent"), ("next", "reward"), ("next", "layout_index"))


# ------------------------------------------------------------------------------------ where chunks run

def trainable_weights(generator: LayoutGenerator) -> dict[str, torch.Tensor]:
    """The parameters RL updates (adapter / LoRA / whole denoiser, per policy.train), by name, on the CPU:
    all a rollout worker needs after an update; frozen weights never travel."""
    return {name: p.detach().cpu() for name, p in generator.denoiser.named_parameters() if p.requires_grad}


class LocalRollouts:
    """Chunks denoised in this process, one after another, on the learner's own generator (nothing to sync);
    each handed to the reward actors at once."""

    def __init__(self, cfg: TrainConfig, generator: LayoutGenerator, device: torch.device):
        self.worker = RolloutWorker(cfg, generator=generator, device=str(device))
        self.worker.ready()
        self.restarts = 0
        self.events: list[str] = []

    def collect(self, chunks: list[Chunk], reward: RemoteReward) -> tuple[list[ChunkResult], list[Ticket]]:
        results, tickets = [], []
        for chunk in chunks:
            result, images = self.worker.collect(chunk)
            tickets.append(reward.submit(images, chunk.sample_layouts))  # scored while the next chunk denoises
            results.append(result)
        return results, tickets

    def close(self) -> None:
        pass


class RolloutPool:
    """N rollout actors fed from one queue of chunks; results come back in chunk order."""

    def __init__(self, cfg: TrainConfig, reward_factory: Callable[[], Reward] | None):
        import ray

        r = cfg.ray
        self.cfg = cfg
        self._cls = ray.remote(RolloutWorker).options(num_cpus=r.worker_cpus, num_gpus=r.worker_gpus)
        self._kwargs = dict(reward_factory=reward_factory, device="cuda" if r.worker_gpus > 0 else "cpu",
                            threads=max(1, int(r.worker_cpus)))
        self.handles = [self._cls.remote(cfg, **self._kwargs) for _ in range(r.workers)]
        self.generation = [0] * r.workers
        self.version = 0
        self.weights = None  # ObjectRef of the current trainable parameters
        self.restarts = 0
        self.events: list[str] = []
        try:
            for handle in self.handles:
                _wait_ready(handle)
        except BaseException:
            self.close()
            raise

    def sync(self, weights: dict[str, torch.Tensor]) -> int:
        """Put the trainable parameters into the object store once; every worker loads them → bytes sent."""
        import ray

        self.version += 1
        self.weights = ray.put(weights)
        for handle in self.handles:
            handle.set_weights.remote(self.weights, self.version)  # runs before the worker's next chunk
        return sum(t.numel() * t.element_size() for t in weights.values())

    def _submit(self, slot: int, chunk: Chunk):
        """→ (ObjectRef of the ChunkResult, ObjectRef of the images or None)."""
        return self.handles[slot].collect.options(num_returns=2).remote(chunk, self.version)

    def _replace(self, slot: int, generation: int, err: BaseException, chunk: Chunk, what: str = "died") -> None:
        """A fresh actor in ``slot`` with the current weights, unless one replaced it since ``generation``."""
        import ray

        if self.generation[slot] != generation:
            return
        ray.kill(self.handles[slot], no_restart=True)
        self.handles[slot] = self._cls.remote(self.cfg, **self._kwargs)
        self.generation[slot] += 1
        _wait_ready(self.handles[slot])
        if self.weights is not None:
            self.handles[slot].set_weights.remote(self.weights, self.version)
        self.restarts += 1
        self.events.append(f"rollout worker {slot} {what} ({first_line(err)}); replaced it and collected chunk "
                           f"{chunk.index} again")

    def collect(self, chunks: list[Chunk], reward: RemoteReward | None) -> tuple[list[ChunkResult], list[Ticket | None]]:
        import ray

        results: list[ChunkResult | None] = [None] * len(chunks)
        tickets: list[Ticket | None] = [None] * len(chunks)
        queue, inflight, attempts = deque(chunks), {}, [0] * len(chunks)
        limit = self.cfg.ray.chunk_timeout  # seconds from handing a chunk over to its result (0: wait forever)

        def lost(slot: int, generation: int, chunk: Chunk, err: BaseException, what: str = "died") -> None:
            attempts[chunk.index] += 1
            if attempts[chunk.index] > self.cfg.ray.max_restarts:
                raise UserError(f"chunk {chunk.index} lost its rollout worker {attempts[chunk.index]} times "
                                f"(last: {first_line(err)}); if workers run out of memory, lower ray.chunk_layouts "
                                "or env.layouts_per_iter; if they are only slow, raise ray.chunk_timeout") from None
            self._replace(slot, generation, err, chunk, what)
            queue.appendleft(chunk)

        while queue or inflight:
            while queue:  # keep every worker QUEUE_DEPTH chunks deep, least loaded first
                load = [sum(1 for s, g, *_ in inflight.values() if s == slot and g == self.generation[slot])
                        for slot in range(len(self.handles))]
                slot = min(range(len(load)), key=load.__getitem__)
                if load[slot] >= QUEUE_DEPTH:
                    break
                chunk = queue.popleft()
                ref, images = self._submit(slot, chunk)
                inflight[ref] = (slot, self.generation[slot], chunk, images, time.monotonic())
            oldest = min(inflight, key=lambda r: inflight[r][4])
            wait = max(0.0, limit - (time.monotonic() - inflight[oldest][4])) if limit else None
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=wait)
            if not done:  # the oldest chunk is overdue: its worker hangs; the others it held fail over as it dies
                slot, generation, chunk, _, _ = inflight.pop(oldest)
                lost(slot, generation, chunk, TimeoutError(f"no result for chunk {chunk.index} in {limit:g} s"), "hung")
                continue
            (ref,) = done
            slot, generation, chunk, images, _ = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except lost_errors() as err:
                lost(slot, generation, chunk, err)
                continue
            except ray.exceptions.RayTaskError as err:
                raise unwrap(err) from None
            results[chunk.index] = result
            if reward is not None:  # its images go from the worker's object store to a reward actor
                tickets[chunk.index] = reward.submit(images, chunk.sample_layouts)
        return results, tickets

    def close(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self.handles = []


def _wait_ready(handle) -> None:
    import ray

    try:
        ray.get(handle.ready.remote())
    except ray.exceptions.RayTaskError as err:
        raise unwrap(err) from None


# ------------------------------------------------------------------------------------------ Ray itself

def check_address(address: str) -> None:
    """A quick TCP check, so an unreachable --address is one line now, not minutes of Ray retries."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--address {address!r}: expected host:port (as printed by `ray start --head`), "
                        "ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UserError(f"--address {address}: no Ray cluster answers there ({err.strerror or err}); start one "
                        "with `ray start --head` and pass the address it prints") from None


def start_ray(cfg: TrainConfig) -> bool:
    """Join ``ray.address``, or start a local Ray (dashboard off unless asked, then on 127.0.0.1 only).
    → whether this call started it (and so must shut it down). A Ray already initialised is used as is."""
    try:
        import ray
    except ImportError:
        raise UserError("--workers / --reward-workers / --learners run on Ray, which is not installed: "
                        "pip install 'diffrl[ray]' (--learners: 'diffrl[train]')") from None

    if ray.is_initialized():
        return False
    r = cfg.ray
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if r.address:
        check_address(r.address)
        try:
            ray.init(address=r.address, **quiet)
        except ConnectionError as err:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                    "; if the cluster uses token authentication (Ray's default), run with RAY_AUTH_MODE=token and "
                    "the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
            raise UserError(f"--address {r.address}: {first_line(err)}{hint}") from None
    else:  # as many logical CPUs as the actors ask for: oversubscribing a small machine is the user's call
        needed = (r.workers * r.worker_cpus + r.reward_workers * r.reward_cpus
                  + (r.learners * r.learner_cpus if r.learners > 1 else 0))
        ray.init(address="local",  # a new local instance, never a `ray start` cluster found lying around
                 num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=r.dashboard,
                 dashboard_host="127.0.0.1", **quiet)
    return True


def check_resources(cfg: TrainConfig) -> None:
    """Actors asking for more than the cluster has would wait forever: say so instead."""
    import ray

    r, have = cfg.ray, ray.cluster_resources()
    cpus = r.workers * r.worker_cpus + r.reward_workers * r.reward_cpus
    gpus = r.workers * r.worker_gpus + r.reward_workers * r.reward_gpus
    if gpus > have.get("GPU", 0) + 1e-9:
        raise UserError(f"the workers ask for {gpus:g} GPUs but the Ray cluster has {have.get('GPU', 0):g}; lower "
                        "ray.worker_gpus / ray.reward_gpus (fractions share a GPU) or --workers / --reward-workers")
    if cpus > have.get("CPU", 0) + 1e-9:
        raise UserError(f"the workers ask for {cpus:g} CPUs but the Ray cluster has {have.get('CPU', 0):g}; lower "
                        "ray.worker_cpus / ray.reward_cpus (fractions such as 0.5 are fine) or --workers / --reward-workers")


# ----------------------------------------------------------------------------------- what the trainer holds

@dataclass
class Collected:
    """One iteration's rollouts, assembled in chunk order."""

    rollout: TensorDictBase  # [B, T] on the CPU; layout_index = row of the iteration's layouts; terminal rewards filled in
    reward: RewardOutput  # over the B samples (info padded across chunks)
    errors: list[str]  # per-sample reward error lines
    events: list[str]  # actor replacements
    stats: dict[str, float]  # worker_restarts, sync_bytes, reward_seconds, reward_wait_seconds
    timeline: list[dict] = field(default_factory=list)  # per chunk: rollout_start/end, reward_submitted/start/end (s)


class ScaleOut:
    """Rollout workers and/or reward actors for `diffrl.algos.trainer.train`."""

    def __init__(self, cfg: TrainConfig, generator: LayoutGenerator, device: torch.device,
                 reward_factory: Callable[[], Reward] | None = None):
        """Start (or join) Ray and every actor; any user error is raised here, before a run folder exists."""
        self.cfg = cfg
        self.generator = generator
        self.chunk_layouts = chunk_layouts(cfg)
        self.reward: RemoteReward | None = None
        self.rollouts: RolloutPool | LocalRollouts | None = None
        factory = reward_factory or partial(build_reward, cfg.reward.name, cfg.reward.model or None, cfg.reward.options,
                                            http_options(cfg))
        self.owns_ray = start_ray(cfg)
        try:
            check_resources(cfg)
            r = cfg.ray
            if r.reward_workers:
                self.reward = RemoteReward(factory, actors=r.reward_workers, num_cpus=r.reward_cpus,
                                           num_gpus=r.reward_gpus, max_restarts=r.max_restarts,
                                           runtime_env=cfg.reward.runtime_env)
            if r.workers:
                self.rollouts = RolloutPool(cfg, None if self.reward else factory)
            else:
                self.rollouts = LocalRollouts(cfg, generator, device)
        except BaseException:
            self.close()
            raise

    def collect(self, iteration: int, layouts: Sequence[Layout]) -> Collected:
        """Denoise (and score) the iteration's layouts with the generator's current weights."""
        chunks = make_chunks(layouts, self.cfg.env.group_size, self.chunk_layouts, self.cfg.seed, iteration)
        restarts_before = self.rollouts.restarts + (self.reward.restarts if self.reward else 0)
        sync_bytes = self.rollouts.sync(trainable_weights(self.generator)) if isinstance(self.rollouts, RolloutPool) else 0
        results, tickets = self.rollouts.collect(chunks, self.reward)
        denoised = time.time()
        outputs, errors, timeline, reward_seconds = [], [], [], 0.0
        for result, ticket in zip(results, tickets):
            times = {"rollout_start": result.start, "rollout_end": result.end}
            if ticket is None:
                outputs.append(result.reward)
                errors += result.errors
            else:
                scored = self.reward.result(ticket)
                outputs.append(scored.output)
                errors += scored.errors
                reward_seconds += scored.end - scored.start
                times.update(reward_submitted=ticket.submitted, reward_start=scored.start, reward_end=scored.end)
            timeline.append(times)
        stats = {"worker_restarts": self.rollouts.restarts + (self.reward.restarts if self.reward else 0) - restarts_before}
        if isinstance(self.rollouts, RolloutPool):
            stats["sync_bytes"] = sync_bytes
        if self.reward is not None:
            stats.update(reward_seconds=reward_seconds, reward_wait_seconds=time.time() - denoised)
        events = self.rollouts.events + (self.reward.take_events() if self.reward else [])
        self.rollouts.events = []
        return Collected(assemble(chunks, results, outputs), cat_outputs(outputs), errors, events, stats, timeline)

    def __enter__(self) -> "ScaleOut":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every actor, and Ray itself if this run started it."""
        for part in (self.rollouts, self.reward):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001  (closing after a failure must not hide that failure)
                    pass
        self.rollouts = self.reward = None
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False


def assemble(chunks: list[Chunk], results: list[ChunkResult], outputs: list[RewardOutput]) -> TensorDictBase:
    """Chunk rollouts → one [B, T] rollout in chunk order, layout_index shifted to the iteration's rows and
    each sample's terminal reward the one its reward actor (or worker) gave."""
    parts = []
    for chunk, result, out in zip(chunks, results, outputs):
        td = result.rollout.clone()
        for key in ("layout_index", ("next", "layout_index")):
            td.set(key, td.get(key) + chunk.first)
        reward = td.get(("next", "reward")).clone()  # [b, T, 1]
        reward[:, -1, 0] = out.rewards.to(reward.dtype)
        td.set(("next", "reward"), reward)
        parts.append(td)
    return torch.cat(parts, 0)
