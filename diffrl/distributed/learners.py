"""``--learners N``: each iteration's update on N processes (Ray Train's `TorchTrainer`: gloo on the CPU, NCCL on
GPUs), equal to one process's update on the same samples.

**The group lives as long as the run.** `LearnerGroup` starts one ``TorchTrainer.fit()`` (in a thread of the
driver, since ``fit`` blocks) whose train function does not return until the run ends: each of its N workers builds
its learner replica once (the driver's recipe, through the ``replica`` factory the trainer passes) and then serves
the driver's tasks — update, save a checkpoint, stop — that a small `Mailbox` actor hands out in order. Ray Train
forms the process group (``MASTER_ADDR``, ranks, devices) and holds the workers; nothing restarts per iteration.
One update costs the driver one ``ray.put`` of the rollout and one round trip through the mailbox (~20 ms here).

**Pieces** (`Whole.pieces`). Every worker gets the whole iteration (the rollout and its layouts): advantages (PPO's
batch normalisation, GRPO's groups), the minibatch order and every random draw are computed on the whole batch by
every rank alike, from the driver's RNG state that comes with the task (and goes back with rank 0's answer, so the
driver's RNG stream is the one process's). Each minibatch of m rows is cut into pieces of ``algo.micro_batch`` rows
(by default ⌈m / N⌉), and the pieces of an optimizer step are dealt round robin over the ranks; rank r runs the
forward and backward of its pieces only. One process with the same config runs the same pieces one after another.

**Exactly one process's update.** A learner's losses are means over rows; a piece's mean is weighed by its share n/m
of the minibatch (`weigh`), so the pieces' gradients add up to the minibatch's. They are added in float64
(`GradSum`; the ranks' sums with one float64 all-reduce in `Shard.sync`, once per optimizer step, before the clip):
a float64 sum of float32 terms is exact (while their magnitudes span under ~2^29), so its order, and how the pieces
were spread over ranks, cannot change it. Since every forward also has the same rows on any N, the float32 gradient,
the clip, the AdamW step and the logs are one process's bit for bit, and the replicas stay identical. (Splitting
rows without fixing the forwards' shape is not enough: a row's velocity differs in its last bits with the rows it
runs with, the log-probability's gradient multiplies that by 1/σ², and AdamW's first step is ±lr on every coordinate
whose gradient is not ~0, so near-zero coordinates flip sign — 1.6e-5 apart at lr 1e-5, measured.) A term every rank
computes whole (the paired ``L_ldm``, which draws its own noise) is backpropagated by rank 0 only. Parameters
without a gradient on every rank keep none (AdamW skips them, as in one process).

**FSDP2** (``ray.learner_strategy=fsdp``, `FsdpShard`): the denoiser sharded over the learners for full fine-tuning;
the same pieces, padded to the same count on every rank, the gradients reduce-scattered per backward (summed), the
rest as above. One process's update up to float rounding (docs/scaling.md has the measured gaps).

**Logs.** Each rank records its pieces' values with their piece index and share; `combine_logs` makes the
one-process value of every minibatch from the pieces in piece order: share-weighted means, the max of ``max_ratio``,
``ESS`` and ``explained_variance`` from per-piece sums — then means over minibatches as one process does.

**Weights** go from rank 0 to the driver after each update (trainable tensors only); the driver's generator then
serves the in-process rollouts, the evaluation, and the rollout workers' sync as before.

**Checkpoints** (`save_checkpoint`): every rank writes its part of one ``torch.distributed.checkpoint`` folder
(`diffrl.distributed.dcp`), atomically renamed into ``checkpoints/checkpoint-NNNNNN/``; a resume reads it in the
driver's learner (any N, also N = 1) and the group takes its state from there before its first update.

**Faults.** Ray Train's ``FailureConfig(max_failures=k)`` would restart the worker group and call the train function
again from the last checkpoint *reported to Ray Train* — it knows nothing of the driver's half of the state (data
order, rollout RNG, the metrics already written). So the group runs with ``max_failures=0``: a learner process that
dies ends ``fit()``, the driver's wait raises `LearnersLost`, and `restarting` runs the whole run again with
``--resume`` semantics (``ray.max_restarts`` times), from the last checkpoint: the redone iterations are those
since it (with ``checkpoint_every=1``, only the one in flight), and the metrics come out as if nothing happened.
A learner killed in the middle of a collective makes its peers' collective fail first (gloo: "Connection reset by
peer"); that answer counts as a dead learner too (`_peer_lost`). Any other Python error inside a learner (a bug, a GPU
out of memory) is answered to the driver and raised there as itself.

Ray is imported inside functions only; importing this module starts nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from diffrl.distributed.dcp import flat_state, prune, restore_flat, save_dcp
from diffrl.errors import UserError

# ----------------------------------------------------------------------------------------- the shard math


class Piece(NamedTuple):
    """A micro-batch: rows ``rows`` of window step ``step``, part ``index`` of an optimizer step's pieces, logged in
    the minibatch's ``slot``, weighing ``share`` = its rows / the minibatch's rows."""

    slot: int
    index: int
    step: int
    rows: slice
    share: float


class GradSum:
    """The gradient of one optimizer step, summed over its backward passes exactly. The first pass's float32 gradient
    is kept as it is (one pass per step: nothing changes); from the second pass on the sum is float64, which holds a
    sum of float32 terms exactly (while their magnitudes span under ~2^29), so it does not depend on the terms' order
    or on how they were split over processes: N learners and one process reach the same float32 gradient."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.sums: list[Tensor | None] = [None] * len(params)

    def backward(self, loss: Tensor) -> None:
        loss.backward()
        for i, p in enumerate(self.params):
            if p.grad is not None:
                total = self.sums[i]
                self.sums[i] = p.grad if total is None else total.double() + p.grad
                p.grad = None

    def take(self) -> list[Tensor | None]:
        sums, self.sums = self.sums, [None] * len(self.params)
        return sums


def weigh(loss: Tensor, share: float) -> Tensor:
    """A piece's mean loss weighed by its share of the minibatch (so the pieces' gradients sum to the minibatch's)."""
    return loss if share == 1.0 else loss * share


class Whole:
    """One process: every piece, no communication."""

    rank, world = 0, 1

    def pieces(self, chunks: list[tuple[int, int, int]], rows: int, minibatch: int, micro: int) -> list[Piece]:
        """This process's pieces of one optimizer step's minibatches ``chunks`` [(slot, step, first row)], of ``rows``
        rows in all: each minibatch cut into pieces of ``micro`` rows (0: one piece), the step's pieces dealt round
        robin over the learners. The pieces, and so every forward's shape, are the same for any number of learners."""
        every: list[Piece] = []
        for slot, step, start in chunks:
            m = min(minibatch, rows - start)
            size = micro or m
            for lo in range(0, m, size):
                n = min(size, m - lo)
                every.append(Piece(slot, len(every), step, slice(start + lo, start + lo + n), n / m))
        return self.mine(every)

    def mine(self, every: list[Piece]) -> list[Piece]:
        return every[self.rank :: self.world]

    def clip(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Clip the step's gradient to ``max_norm`` → its norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sync(self, params: list[Tensor], grads: GradSum) -> None:
        """The step's summed gradients become the parameters' ``grad``."""
        for p, total in zip(params, grads.take()):
            p.grad = None if total is None else total.to(p.dtype)

    def logs(self) -> "Logs":
        return Logs()


WHOLE = Whole()


class Shard(Whole):
    """Rank ``rank`` of ``world`` learner processes (a torch.distributed process group is up)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.bytes = 0  # gradient bytes this rank all-reduced since the counter was last read

    def sync(self, params: list[Tensor], grads: GradSum) -> None:
        """Sum the ranks' gradients in float64 (exact, so in any order: one flat all-reduce, plus one of which
        parameters have any), then cast each back to its parameter's dtype."""
        self.all_reduce(params, grads.take())

    def all_reduce(self, params: list[Tensor], sums: list[Tensor | None]) -> None:
        """``params``' gradients from every rank's ``sums``: one float64 all-reduce, cast back to their dtype."""
        import torch.distributed as dist

        if not params:
            return
        device = params[0].device
        has = torch.tensor([total is not None for total in sums], dtype=torch.int32, device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [i for i, h in enumerate(has.tolist()) if h]
        for p in params:
            p.grad = None
        if not live:
            return
        flat = torch.cat([(sums[i].double() if sums[i] is not None else torch.zeros(params[i].numel(), dtype=torch.float64,
                                                                                  device=device)).reshape(-1) for i in live])
        dist.all_reduce(flat)
        self.bytes += flat.numel() * flat.element_size()
        offset = 0
        for i in live:
            p = params[i]
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def logs(self) -> "ShardLogs":
        return ShardLogs()

    def gather(self, generator) -> dict[str, Tensor] | None:
        """The trainable weights, on rank 0 (every rank holds them whole)."""
        if self.rank != 0:
            return None
        return {name: p.detach().cpu() for name, p in generator.denoiser.named_parameters() if p.requires_grad}


class FsdpShard(Shard):
    """Rank ``rank`` of ``world`` learners with the denoiser sharded by FSDP2 (``ray.learner_strategy=fsdp``).

    `wrap` shards it once the state has arrived: every block of each top-level ModuleList (MM-DiT blocks, the layout
    adapter's fusers) is a ``fully_shard`` unit, then the root; the optimizer is rebuilt over the sharded parameters
    with its state distributed alike. FSDP reduce-scatters each backward's gradient, summed (not averaged: each piece
    is weighed by its share; gloo has no PREMUL_SUM, hence the forced sum, set on every unit). Parameters outside the
    denoiser (PPO's critic) stay whole and are all-reduced as with ddp. Every rank must run the same forwards and
    backwards, so a rank short of pieces runs a copy of one with share 0 (no gradient, no log). The sums of a float32
    reduce-scatter depend on the order, so this is one process's update up to float rounding, not bit for bit."""

    def __init__(self, rank: int, world: int):
        super().__init__(rank, world)
        self.sharded_bytes = 0  # the full float32 gradient of the sharded parameters: reduce-scattered per backward
        self.passes = 0

    def wrap(self, learner, generator) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        denoiser = generator.denoiser
        before = dict(denoiser.named_parameters())
        mesh = init_device_mesh(next(iter(before.values())).device.type, (self.world,))
        old = _old_module(learner, denoiser)
        shard_blocks(denoiser, mesh, sum_gradients=True)
        if old is not None:  # NFT's θ_old: its checkpointed buffers become views of the sharded copy's shards
            shard_blocks(old, mesh, sum_gradients=False)  # never backpropagated
            for i, name in enumerate(learner.old.names):
                learner.old.register_buffer(f"p{i}", old.get_parameter(name).detach())
            learner.old_module = old
        after = dict(denoiser.named_parameters())
        swap = {id(before[name]): after[name] for name in before}
        learner.optimizer = _resharded_optimizer(learner.optimizer, swap)
        if hasattr(learner, "params"):  # the forward-process learners keep their list
            learner.params = [swap.get(id(p), p) for p in learner.params]
        self.sharded_bytes = sum(p.numel() * 4 for p in after.values() if p.requires_grad)

    def mine(self, every: list[Piece]) -> list[Piece]:
        """Round robin, padded to the same count on every rank with share-0 copies (FSDP's collectives must match)."""
        pieces = every[self.rank :: self.world]
        pieces += [every[0]._replace(share=0.0)] * (-(-len(every) // self.world) - len(pieces))
        self.passes += len(pieces)
        return pieces

    def sync(self, params: list[Tensor], grads: GradSum) -> None:
        """Sharded gradients are already summed over the ranks (reduce-scatter); the rest are all-reduced."""
        from torch.distributed.tensor import DTensor

        sums = grads.take()
        whole = [(p, total) for p, total in zip(params, sums) if not isinstance(p, DTensor)]
        for p, total in zip(params, sums):
            if isinstance(p, DTensor):
                p.grad = None if total is None else total.to(p.dtype)
        self.all_reduce([p for p, _ in whole], [total for _, total in whole])
        self.bytes += self.passes * self.sharded_bytes
        self.passes = 0

    def clip(self, params: list[Tensor], max_norm: float) -> Tensor:
        """torch's clip over sharded and whole gradients together: the shards' squared norms summed over the ranks."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float64, device=params[0].device)  # on the device NCCL reduces on
        sharded = sum((g.to_local().double().pow(2).sum() for g in grads if isinstance(g, DTensor)), zero)
        dist.all_reduce(sharded)
        whole = sum((g.double().pow(2).sum() for g in grads if not isinstance(g, DTensor)), zero)
        norm = (sharded + whole).sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.item())
        return norm

    def gather(self, generator) -> dict[str, Tensor] | None:
        """Every rank gathers the sharded weights (a collective); rank 0 gets them all."""
        from torch.distributed.tensor import DTensor

        weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                   for name, p in generator.denoiser.named_parameters() if p.requires_grad}
        return weights if self.rank == 0 else None


def shard_blocks(module: nn.Module, mesh, *, sum_gradients: bool) -> None:
    """FSDP2 ``fully_shard`` units: every block of each top-level ModuleList (MM-DiT blocks, the layout adapter's
    fusers), then the root. ``sum_gradients``: each backward's reduce-scatter sums over the ranks instead of averaging
    (a piece is weighed by its share); gloo has no PREMUL_SUM, hence the forced sum, and it is set on every unit (on
    the root alone the blocks' gradients came back halved)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    units: list[str] = []
    for name, part in module.named_modules():
        if isinstance(part, nn.ModuleList) and not any(name.startswith(u + ".") for u in units):
            for i, block in enumerate(part):
                fully_shard(block, mesh=mesh)
                units.append(f"{name}.{i}")
    fully_shard(module, mesh=mesh)
    if sum_gradients:
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)


def _old_module(learner, denoiser: nn.Module) -> nn.Module | None:
    """DiffusionNFT's v_old under FSDP: a frozen copy of the denoiser holding θ_old (sharded like it by the caller),
    since ``functional_call`` on a sharded module would run its own weights; None for other learners."""
    import copy

    if getattr(learner, "old", None) is None:
        return None
    old = copy.deepcopy(denoiser).requires_grad_(False)
    with torch.no_grad():
        for name, value in learner.old.as_dict().items():
            old.get_parameter(name).copy_(value)
    return old


def _resharded_optimizer(optimizer: torch.optim.Optimizer, swap: dict[int, Tensor]) -> torch.optim.Optimizer:
    """The same optimizer over the swapped (sharded) parameters, its state distributed like each parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [swap.get(id(p), p) for p in g["params"]]}
              for g in optimizer.param_groups]
    fresh = type(optimizer)(groups)  # every group carries all its settings
    for old_group, new_group in zip(optimizer.param_groups, fresh.param_groups):
        for old, new in zip(old_group["params"], new_group["params"]):
            state = optimizer.state.get(old)
            if state and isinstance(new, DTensor):
                state = {k: distribute_tensor(v, new.device_mesh, new.placements)
                         if torch.is_tensor(v) and v.shape == new.shape else v for k, v in state.items()}
            if state:
                fresh.state[new] = state
    return fresh


class Logs:
    """One process's logged values, each with the piece it came from → the logs (`combine_logs`)."""

    STEP = 1 << 30  # the piece index of a value of the whole optimizer step (grad_norm, loss_ldm)

    def __init__(self) -> None:
        self.records: list[tuple[int, int, str, Any, float | None]] = []

    def add(self, slot: int, index: int, key: str, value, share: float | None) -> None:
        """``value`` of ``key`` from piece ``index`` in minibatch ``slot`` (share None: the whole step's value)."""
        if share == 0.0:  # a padding piece (`FsdpShard`): run for FSDP's collectives only
            return
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(-1).tolist()
            value = value[0] if len(value) == 1 and not key.startswith("stat_") else value
        self.records.append((slot, index, key, value, share))

    def result(self) -> dict[str, float]:
        return combine_logs([self.records])


class ShardLogs(Logs):
    """A rank's records; `result` gathers every rank's and combines them (a collective)."""

    def result(self) -> dict[str, float]:
        import torch.distributed as dist

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.records)
        return combine_logs(gathered)


def combine_logs(ranks: list[list[tuple[int, int, str, Any, float | None]]]) -> dict[str, float]:
    """Every rank's (minibatch slot, piece index, key, value, share) records → the one-process logs: per minibatch
    the pieces' values in piece order (so the same on any number of learners), then the mean over minibatches.

    One piece, or share None (a value of the whole step, alike on every rank): its value. Else share-weighted means,
    the max of ``max_ratio``, ``ESS`` and ``explained_variance`` from per-piece sums; ``stat_ev``: [mean, variance] of
    the critic's targets t and of its residuals e over the piece, for ``explained_variance``."""
    entries: dict[tuple[int, str], list[tuple[int, Any, float | None]]] = defaultdict(list)
    keys: dict[str, None] = {}
    for records in ranks:
        for slot, index, key, value, share in records:
            entries[(slot, key)].append((index, value, share))
            keys.setdefault(key, None)
    merged: dict[str, list[float]] = defaultdict(list)
    for (slot, key), got in sorted(entries.items(), key=lambda item: item[0][0]):
        if not key.startswith("stat_"):
            got = [(value, share) for _, value, share in sorted(got, key=lambda entry: entry[0])]
            merged[key].append(_combined(key, got, sorted(entries.get((slot, "mean_ratio"), [])),
                                         sorted(entries.get((slot, "stat_ev"), []))))
    return {key: sum(merged[key]) / len(merged[key]) for key in keys if key in merged}


def _combined(key: str, got: list[tuple[Any, float | None]], ratios: list, moments: list) -> float:
    """One minibatch's value of ``key`` from its pieces' (value, share)."""
    if len(got) == 1 or any(share is None for _, share in got):
        return got[0][0]
    if key == "max_ratio":
        return max(v for v, _ in got)
    if key == "ESS":  # ESS/n = (Σw)²/Σw²/n, with Σw = n_r·mean_ratio_r and Σw² = n_r·mean_ratio_r²/ESS_r per piece
        means = [v for _, v, _ in ratios]
        sum_w = sum(s * r for (_, s), r in zip(got, means))
        sum_w2 = sum(s * r * r / v for (v, s), r in zip(got, means))
        return sum_w * sum_w / sum_w2
    if key == "explained_variance":  # torchrl's 1 − var(t − v)/(var(t) + eps), from the pieces' means and variances
        parts = [(m, s) for _, m, s in moments]
        var_t, var_e = (_pooled_variance([(m[i], m[i + 1], s) for m, s in parts]) for i in (0, 2))
        return 1.0 - var_e / (var_t + torch.finfo(torch.float32).eps)
    return sum(v * s for v, s in got)


def _pooled_variance(parts: list[tuple[float, float, float]]) -> float:
    """(mean, population variance, share of the rows) of each part → the variance of their union (Chan et al.)."""
    mean = sum(m * s for m, _, s in parts)
    return sum(s * (v + (m - mean) ** 2) for m, v, s in parts)


# ------------------------------------------------------------------------------------------- the mailbox


class Mailbox:
    """Tasks for every learner, in order, and their answers (a Ray actor with async methods)."""

    def __init__(self, world: int):
        import asyncio

        self.world = world
        self.tasks: dict[int, dict] = {}
        self.taken: dict[int, int] = defaultdict(int)
        self.replies: dict[int, dict[int, Any]] = defaultdict(dict)
        self.changed = asyncio.Condition()

    async def put(self, seq: int, task: dict) -> None:
        async with self.changed:
            self.tasks[seq] = task
            self.changed.notify_all()

    async def take(self, seq: int) -> dict:
        async with self.changed:
            await self.changed.wait_for(lambda: seq in self.tasks)
            task = self.tasks[seq]
            self.taken[seq] += 1
            if self.taken[seq] == self.world:
                del self.tasks[seq], self.taken[seq]
            return task

    async def reply(self, seq: int, rank: int, value: Any) -> None:
        async with self.changed:
            self.replies[seq][rank] = value
            self.changed.notify_all()

    async def result(self, seq: int) -> dict[int, Any]:
        """Every rank's answer to task ``seq`` — or, as soon as one rank answers with an error, the answers so far."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.replies[seq]) == self.world
                                        or any(isinstance(v, dict) and "error" in v for v in self.replies[seq].values()))
            return self.replies.pop(seq)


# ------------------------------------------------------------------------------------- a learner process


def learner_loop(config: dict) -> None:
    """The train function of every TorchTrainer worker: build the replica once, then serve tasks until "stop"."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg, box = config["cfg"], config["box"]
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if cfg.model.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (the logs, DCP's planning) use the current device
    learner, generator, store = config["replica"](cfg, device, ray.get(config["initial"]))
    learner.shard = (FsdpShard if cfg.ray.learner_strategy == "fsdp" else Shard)(rank, world)
    for seq in range(1 << 62):
        task = ray.get(box.take.remote(seq))
        if task["kind"] == "stop":
            return
        try:
            answer = _serve(task, rank, learner, generator, store, device)
        except Exception as err:  # noqa: BLE001  (raised again by the driver, as itself)
            answer = {"error": err}
        ray.get(box.reply.remote(seq, rank, answer))


def _serve(task: dict, rank: int, learner, generator, store, device: torch.device) -> dict:
    import ray

    from diffrl.algos.sft import Paired

    shard = learner.shard
    if task["kind"] == "state":  # the driver's learner state (a fresh start or a resumed checkpoint)
        tensors, meta = ray.get(task["state"])
        learner.iteration, _ = restore_flat(tensors, meta, learner.trainable_modules(), learner.optimizer)
        if isinstance(shard, FsdpShard):  # sharded once the whole state is in
            shard.wrap(learner, generator)
        return {}
    if task["kind"] == "save":
        tensors, meta = flat_state(learner.trainable_modules(), learner.optimizer, task["rng"], task["iteration"])
        save_dcp(Path(task["folder"]), tensors)
        return {"meta": meta} if rank == 0 else {}
    assert task["kind"] == "update", task["kind"]
    _set_rng(task["rng"], device)
    rollout = ray.get(task["rollout"]).to(device)
    store.set(task["layouts"], generator.encode_layouts(task["layouts"]).to(device))
    paired = Paired(ray.get(task["paired"]).to(device), store.conditioning) if task["paired"] is not None else None
    learner.iteration = task["iteration"]
    shard.bytes = 0
    logs = learner.update(rollout, paired)
    weights = shard.gather(generator)
    if rank != 0:
        return {}
    held = sum(_local(p).numel() * p.element_size() for p in generator.denoiser.parameters() if p.requires_grad)
    return {"logs": logs, "weights": weights, "rng": _get_rng(device), "allreduce_bytes": shard.bytes, "held": held}


def _local(p: Tensor) -> Tensor:
    """The part of a parameter this process holds (its FSDP shard, or all of it)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _get_rng(device: torch.device) -> dict[str, Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng(rng: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


# ---------------------------------------------------------------------------------------------- the driver


class LearnersLost(RuntimeError):
    """A learner process died: the run goes on from its last checkpoint (`restarting`)."""


class LearnerGroup:
    """The update of `diffrl.algos.trainer.train` on ``ray.learners`` processes; quacks like its learner
    (``update``, ``iteration``, ``trainable_modules``, ``optimizer``) and saves checkpoints of its own.

    ``learner``: the driver's learner, built as in one process. Until the first update its modules and optimizer
    are the state (a resume loads a checkpoint into them); the group then hands that state to every worker, and from
    then on the workers hold it. ``replica(cfg, device, initial_weights) -> (learner, generator, store)`` builds a
    worker's learner."""

    def __init__(self, cfg, learner, generator, store, replica: Callable):
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from diffrl.distributed.ray_workers import start_ray, trainable_weights

        self.cfg, self.learner, self.generator, self.store = cfg, learner, generator, store
        self.device = torch.device(cfg.model.device)
        self.owns_ray = start_ray(cfg)
        self.seq = 0
        self.sent_state = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        try:
            self._check_resources()
            world = cfg.ray.learners
            self.box = ray.remote(Mailbox).options(num_cpus=0, max_concurrency=4 * world + 8).remote(world)
            cuda = self.device.type == "cuda"
            resources = {"CPU": cfg.ray.learner_cpus, **({"GPU": 1} if cuda else {})}
            run = Path(cfg.out).resolve()
            trainer = TorchTrainer(
                learner_loop,
                train_loop_config={"cfg": _absolute_paths(cfg), "box": self.box, "replica": replica,
                                   "initial": ray.put(trainable_weights(generator)),
                                   "threads": max(1, int(cfg.ray.learner_cpus))},
                torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
                scaling_config=ScalingConfig(num_workers=world, use_gpu=cuda, resources_per_worker=resources),
                run_config=RunConfig(name=f"learners-{os.getpid()}-{time.time_ns()}", storage_path=str(run / "ray_train"),
                                     failure_config=FailureConfig(max_failures=0)),
            )
            self.thread = threading.Thread(target=self._fit, args=(trainer,), name="diffrl-learners", daemon=True)
            self.thread.start()  # the workers build their replicas while the driver goes on (base evaluation)
        except BaseException:
            self.close()
            raise

    # --- what the trainer calls, as on a learner

    @property
    def iteration(self) -> int:
        return self.learner.iteration if hasattr(self.learner, "iteration") else 0

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.learner.iteration = value

    def trainable_modules(self):
        """The driver's learner's modules: the state until the first update (a resume loads into them)."""
        if self.sent_state:
            raise RuntimeError("after the first update the learners hold the state: save it with save_checkpoint")
        return self.learner.trainable_modules()

    @property
    def optimizer(self):
        if self.sent_state:
            raise RuntimeError("after the first update the learners hold the state: save it with save_checkpoint")
        return self.learner.optimizer

    def update(self, rollout, paired=None) -> dict[str, float]:
        """One iteration's update on every learner → the one-process logs (and the bytes it moved)."""
        import ray

        self._send_state()
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(self.device)}
                                                  if self.device.type == "cuda" else {})}
        answers = self._ask({"kind": "update", "rollout": ray.put(rollout.cpu()), "layouts": list(self.store.layouts),
                             "paired": ray.put(paired.latents.cpu()) if paired is not None else None,
                             "rng": rng, "iteration": self.iteration})
        first = answers[0]
        params = dict(self.generator.denoiser.named_parameters())
        with torch.no_grad():
            for name, value in first["weights"].items():
                params[name].copy_(value)
        torch.set_rng_state(first["rng"]["cpu"])
        if "cuda" in first["rng"]:
            torch.cuda.set_rng_state(first["rng"]["cuda"], self.device)
        if hasattr(self.learner, "iteration"):
            self.learner.iteration += 1
        return {**first["logs"], "allreduce_bytes": first["allreduce_bytes"], "learner_param_bytes": first["held"],
                "learner_sync_bytes": sum(t.numel() * t.element_size() for t in first["weights"].values())}

    def save_checkpoint(self, folder: Path, iteration: int, rng: dict[str, Tensor], keep: int = 2) -> Path:
        """Every learner writes its part of ``folder/checkpoint-NNNNNN/`` (torch.distributed.checkpoint), which
        appears under that name only once complete."""
        import json
        import shutil

        from diffrl.files import atomic_write_text

        self._send_state()
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"checkpoint-{iteration:06d}"
        tmp = folder / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        answers = self._ask({"kind": "save", "folder": str(tmp), "rng": {k: v.cpu() for k, v in rng.items()},
                             "iteration": iteration})
        atomic_write_text(tmp / "meta.json", json.dumps(answers[0]["meta"]))
        if final.exists():  # written before by a run that died before its metrics said so
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(folder, keep)
        return final

    # --- plumbing

    def _send_state(self) -> None:
        """Hand the driver's learner state to the workers, once, before they first need it."""
        import ray

        if self.sent_state:
            return
        tensors, meta = flat_state(self.learner.trainable_modules(), self.learner.optimizer, {},
                                   getattr(self.learner, "iteration", 0))
        self._ask({"kind": "state", "state": ray.put((tensors, meta))})
        self.sent_state = True

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001  (the driver's next wait raises LearnersLost with it)
            self.error = err

    def _ask(self, task: dict) -> list[Any]:
        """Post a task to every learner and wait for their answers (rank order); a dead learner → LearnersLost."""
        import ray

        seq, self.seq = self.seq, self.seq + 1
        ray.get(self.box.put.remote(seq, task))
        pending = self.box.result.remote(seq)
        while not ray.wait([pending], timeout=0.5)[0]:
            if self.thread is None or not self.thread.is_alive():
                raise LearnersLost(f"the learner group stopped: {_first_line(self.error)}")
        answers = ray.get(pending)
        for answer in answers.values():
            if "error" in answer:
                if _peer_lost(answer["error"]):  # a learner died mid-collective: its peers' collective failed first
                    raise LearnersLost(f"a learner lost its peers: {_first_line(answer['error'])}")
                raise answer["error"]
        return [answers[rank] for rank in sorted(answers)]

    def _check_resources(self) -> None:
        import ray

        r, have = self.cfg.ray, ray.cluster_resources()
        cpus = r.learners * r.learner_cpus + r.workers * r.worker_cpus + r.reward_workers * r.reward_cpus
        if cpus > have.get("CPU", 0) + 1e-9:
            raise UserError(f"the learners and workers ask for {cpus:g} CPUs but the Ray cluster has {have.get('CPU', 0):g}; "
                            "lower ray.learner_cpus (fractions such as 0.5 are fine) or --learners")
        if self.device.type == "cuda":
            gpus = r.learners + r.workers * r.worker_gpus + r.reward_workers * r.reward_gpus
            if gpus > have.get("GPU", 0) + 1e-9:
                raise UserError(f"--learners {r.learners} takes a GPU each, and with the workers {gpus:g} GPUs are asked "
                                f"for, but the Ray cluster has {have.get('GPU', 0):g}; lower --learners")

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the learners (their train function returns, so fit() ends), and Ray if this group started it."""
        import ray

        if self.thread is not None and self.thread.is_alive():
            try:
                ray.get(self.box.put.remote(self.seq, {"kind": "stop"}), timeout=10)
                self.thread.join(timeout=60)
            except Exception:  # noqa: BLE001  (closing after a failure must not hide that failure)
                pass
        self.thread = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False


def restarting(train: Callable, cfg, resume: bool = False, progress: bool = True) -> Path:
    """``train(cfg, resume, progress)``, run again from the last checkpoint (with ``--resume`` semantics) when a
    learner process dies, at most ``ray.max_restarts`` times."""
    import sys

    for attempt in range(cfg.ray.max_restarts + 1):
        try:
            return train(cfg, resume=resume, progress=progress)
        except LearnersLost as err:
            if attempt == cfg.ray.max_restarts or not cfg.out:
                raise UserError(f"{err}; it happened {attempt + 1} time(s) (ray.max_restarts={cfg.ray.max_restarts}); "
                                f"continue with --resume {cfg.out or 'RUN'}") from None
            print(f"diffrl: {err}; the run goes on from its last checkpoint (restart {attempt + 1} of "
                  f"{cfg.ray.max_restarts})", file=sys.stderr)
            resume = True
    raise AssertionError("unreachable")


def _absolute_paths(cfg):
    """The config with local model folders made absolute: the learner processes may start in another folder."""
    model = cfg.model
    name = str(Path(model.name).resolve()) if Path(model.name).exists() else model.name
    adapter = str(Path(model.adapter).resolve()) if model.adapter else ""
    return replace(cfg, model=replace(model, name=name, adapter=adapter))


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "remote process exited")  # what gloo / NCCL say when a peer has died


def _peer_lost(err: BaseException) -> bool:
    """Did this learner's error come from a collective whose peer process died (rather than from a bug or an OOM,
    which are raised as themselves)?"""
    import torch.distributed as dist

    return isinstance(err, dist.DistNetworkError) or any(text in str(err) for text in PEER_LOST)


def _first_line(err: BaseException | None) -> str:
    if err is None:
        return "its thread ended"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]

