"""A reward that runs elsewhere: Ray actors, each holding the reward on its own device, scoring whole
batches while the caller goes on with other work.

    from functools import partial
    from diffrl.rewards import build_reward
    from diffrl.rewards.remote import RemoteReward

    remote = RemoteReward(partial(build_reward, "gdino", "/models/grounding-dino-tiny"), actors=2, num_gpus=1)
    ticket = remote.submit(images, layouts)     # returns at once: images go to an actor through the object store
    ...                                         # denoise the next batch meanwhile
    scored = remote.result(ticket)              # waits if it must → `Scored` (CPU tensors)
    out = remote(images, layouts)               # submit + result: a RemoteReward stands wherever a Reward does

``reward_factory`` is any picklable callable that builds the reward inside the actor (weights load there,
on the actor's device: ``cuda`` when it has a GPU, else the CPU), so the detector and the generator need
not share a device, nor an environment: ``runtime_env`` (Ray's: pip / conda packages, env_vars, working_dir)
gives the actors their own dependencies. Inside the actor the reward is a `GuardedReward`: a sample it raises
on comes back with a NaN reward and its error line in `Scored.errors`, never as a failed batch. Batches go to the
actors in turn (round-robin); an actor that dies (process killed, node lost) is replaced by a fresh one
and its batch scored again, up to ``max_restarts`` times per batch, each replacement logged in `events`.

Ray is imported when a RemoteReward is built, never by ``import diffrl.rewards``; call ``ray.init(...)``
first to choose the cluster (otherwise Ray starts a local one on first use).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.rewards.base import Reward, RewardOutput
from diffrl.rewards.guard import GuardedReward


@dataclass
class Scored:
    """What an actor sends back for one batch."""

    output: RewardOutput  # rewards [B] (NaN where scoring raised) and info, on the CPU
    errors: list[str]  # one line per sample the reward raised on
    start: float  # wall-clock seconds (time.time()) when the actor started and finished scoring
    end: float


class RewardServer:
    """The body of a reward actor (a plain class; `RemoteReward` wraps it with ``ray.remote``)."""

    def __init__(self, reward_factory: Callable[[], Reward], device: str, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.error: BaseException | None = None
        try:
            self.reward = GuardedReward(reward_factory())
        except Exception as err:  # noqa: BLE001  (reported by ready(), so the driver sees the real cause)
            self.error = err

    def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True

    @torch.no_grad()
    def score(self, images: Tensor, layouts: Sequence[Layout]) -> Scored:
        start = time.time()
        out = self.reward(images.to(self.device), layouts)
        output = RewardOutput(out.rewards.detach().float().cpu(), {k: v.detach().cpu() for k, v in out.info.items()})
        return Scored(output, self.reward.take_errors(), start, time.time())


@dataclass
class Ticket:
    """A batch handed to an actor; `RemoteReward.result` turns it into its `Scored`."""

    slot: int  # which actor
    generation: int  # which incarnation of that actor (bumped when it is replaced)
    ref: Any  # ObjectRef of the Scored
    images: Any  # ObjectRef of the images, kept to score them again if the actor dies
    layouts: list[Layout]
    submitted: float  # wall-clock seconds (time.time()) when it was handed over
    attempts: int = 1


def lost_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean "the process doing the work is gone", not "the work failed"."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.OutOfMemoryError, rex.ObjectLostError, rex.NodeDiedError)


def unwrap(err: BaseException) -> BaseException:
    """A remote UserError or GPU out-of-memory error as itself (one line for the CLI), anything else as Ray gave it."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, (UserError, torch.OutOfMemoryError)):
        return cause
    return err


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class RemoteReward(Reward):
    """``actors`` Ray actors, each with its own copy of ``reward_factory()`` on its own device
    (``device`` None: cuda when the actor has a GPU, else cpu), in Ray's ``runtime_env`` when given (pip or
    conda packages, env_vars, …: ``reward.runtime_env``)."""

    name = "remote"

    def __init__(self, reward_factory: Callable[[], Reward], *, actors: int = 1, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, device: str | None = None, max_restarts: int = 3,
                 runtime_env: dict | None = None):
        import ray

        if actors < 1:
            raise UserError(f"a remote reward needs at least one actor, got {actors}")
        self.reward_factory = reward_factory
        self.num_cpus = num_cpus
        self.max_restarts = max_restarts  # replacements of a dead actor per batch before giving up
        self.events: list[str] = []  # one line per replaced actor, for the caller to log (take_events)
        self.errors: list[str] = []  # per-sample error lines of the batches scored through __call__
        self.restarts = 0
        self._cls = ray.remote(RewardServer).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                     **({"runtime_env": runtime_env} if runtime_env else {}))
        self._device = device or ("cuda" if num_gpus > 0 else "cpu")
        self._handles = [self._start() for _ in range(actors)]
        self._generation = [0] * actors
        self._next = 0
        try:
            for handle in self._handles:
                self._wait_ready(handle)
        except BaseException:
            self.close()
            raise

    def _start(self):
        return self._cls.remote(self.reward_factory, self._device, max(1, int(self.num_cpus)))

    def _wait_ready(self, handle) -> None:
        import ray

        try:
            ray.get(handle.ready.remote())
        except ray.exceptions.RayTaskError as err:
            raise unwrap(err) from None

    def submit(self, images: Tensor | Any, layouts: Sequence[Layout]) -> Ticket:
        """Hand a batch to the next actor and return at once. ``images``: float [B, 3, H, W] in [0, 1]
        (copied to the object store from the CPU) or an ObjectRef of such a tensor (passed as is)."""
        import ray

        if isinstance(images, Tensor):
            images = ray.put(images.detach().cpu())
        slot = self._next % len(self._handles)
        self._next += 1
        layouts = list(layouts)
        ref = self._handles[slot].score.remote(images, layouts)
        return Ticket(slot, self._generation[slot], ref, images, layouts, time.time())

    def result(self, ticket: Ticket) -> Scored:
        """The batch's scores, waiting for them if need be; a dead actor is replaced and the batch scored again."""
        import ray

        while True:
            try:
                return ray.get(ticket.ref)
            except lost_errors() as err:
                if ticket.attempts > self.max_restarts:
                    raise RuntimeError(f"reward actor {ticket.slot} died {ticket.attempts} times scoring one batch "
                                       f"(last: {first_line(err)}); see the Ray logs (/tmp/ray/session_latest/logs)") from err
                self._replace(ticket.slot, ticket.generation, err)
                ticket.generation = self._generation[ticket.slot]
                ticket.ref = self._handles[ticket.slot].score.remote(ticket.images, ticket.layouts)
                ticket.attempts += 1
            except ray.exceptions.RayTaskError as err:
                raise unwrap(err) from None

    def _replace(self, slot: int, generation: int, err: BaseException) -> None:
        """Start a fresh actor in ``slot``, unless another batch already did since ``generation``."""
        import ray

        if self._generation[slot] != generation:
            return
        ray.kill(self._handles[slot], no_restart=True)
        self._handles[slot] = self._start()
        self._generation[slot] += 1
        self._wait_ready(self._handles[slot])
        self.restarts += 1
        self.events.append(f"reward actor {slot} died ({first_line(err)}); replaced it and scored its batch again")

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        scored = self.result(self.submit(images, layouts))
        self.errors += scored.errors
        out = scored.output
        return RewardOutput(out.rewards.to(images.device), {k: v.to(images.device) for k, v in out.info.items()})

    def take_events(self) -> list[str]:
        """The actor replacements since the last call (and forget them)."""
        events, self.events = self.events, []
        return events

    def take_errors(self) -> list[str]:
        """The per-sample error lines of batches scored through ``__call__`` since the last call (and forget them)."""
        errors, self.errors = self.errors, []
        return errors

    def close(self) -> None:
        import ray

        for handle in self._handles:
            ray.kill(handle, no_restart=True)
        self._handles = []
