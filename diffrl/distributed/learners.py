"""``--learners N``: each iteration's update on N processes (Ray Train's `TorchTrainer`: gloo on the CPU, NCCL on
GPUs), equal to one process's update on the same samples.

**The group lives as long as the run.** `LearnerGroup` starts one ``TorchTrainer.fit()`` (in a thread of the
driver, since ``fit`` blocks) whose train function does not return until the run ends: each of its N workers builds
its learner replica once (the driver's recipe, through the ``replica`` factory the trainer passes) and then serves
the driver's tasks — update, save a checkpoint, stop — that a small `Mailbox` actor hands out in order. Ray Train
forms the process group (``MASTER_ADDR``, ranks, devices) and holds the workers; nothing restarts per iteration.
One update costs the driver one ``ray.put`` of the rollout and one round trip through the mailbox (~20 ms here).

**Sharding** (`Shard`). Every worker gets the whole iteration (the rollout and its layouts): advantages (PPO's
batch normalisation, GRPO's groups), the minibatch order and every random draw are computed on the whole batch by
every rank alike, from the driver's RNG state that comes with the task (and goes back with rank 0's answer, so the
driver's RNG stream is the one process's). Each minibatch of m rows is then cut into N contiguous row ranges; rank r
runs the forward and backward on its n_r rows only.

**Loss normalisation.** A learner's losses are means over a minibatch's rows. Rank r scales its shard's mean by
``n_r / m`` (`Shard.weigh`), so its gradient is Σ_{its rows} ∇ℓ / m; the all-reduce *sums* the ranks' gradients
into Σ_{all rows} ∇ℓ / m, the one-process minibatch mean, whatever the split (uneven, or an empty shard). Terms
every rank computes in full (the paired ``L_ldm``, which draws its own noise) are weighed 1/N. The gradients are
summed once per optimizer step, after the epoch's accumulation and before the clip (`Shard.sync`), so
``clip_grad_norm_`` sees the summed gradient and every rank takes the same step: replicas stay identical.
Parameters without a gradient on every rank keep none (AdamW skips them, as in one process).

**Logs.** Each rank records its shard's values with their share n_r/m; `combine_logs` makes the one-process value
of every minibatch: share-weighted means, the max of ``max_ratio``, ``ESS`` and ``explained_variance`` from
per-shard sums — then means over minibatches as `diffrl.algos.learner` does.

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
A Python error inside a learner (a bug, a GPU out of memory) is answered to the driver and raised there as itself.

Ray is imported inside functions only; importing this module starts nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from diffrl.distributed.dcp import flat_state, prune, restore_flat, save_dcp
from diffrl.errors import UserError

# ----------------------------------------------------------------------------------------- the shard math


class Whole:
    """One process: every row, weight 1, no communication (the update exactly as before ``--learners``)."""

    rank, world, replicated = 0, 1, 1.0

    def part(self, start: int, n: int) -> tuple[slice, float]:
        """(rows of the minibatch ``[start, start + n)`` this process takes, their share of it)."""
        return slice(start, start + n), 1.0

    def weigh(self, loss: Tensor, share: float) -> Tensor:
        return loss

    def sync(self, params: list[Tensor]) -> None:
        pass

    def logs(self) -> "MeanLogs":
        return MeanLogs()


WHOLE = Whole()


class Shard(Whole):
    """Rank ``rank`` of ``world`` learner processes (a torch.distributed process group is up)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.replicated = rank, world, 1.0 / world
        self.bytes = 0  # gradient bytes this rank all-reduced since the counter was last read

    def part(self, start: int, n: int) -> tuple[slice, float]:
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return slice(start + lo, start + hi), (hi - lo) / n

    def weigh(self, loss: Tensor, share: float) -> Tensor:
        return loss * share

    def sync(self, params: list[Tensor]) -> None:
        """Sum the ranks' gradients (one flat all-reduce per dtype, plus one of which parameters have any)."""
        import torch.distributed as dist

        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for dtype in dict.fromkeys(p.dtype for p in live):
            group = [p for p in live if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            dist.all_reduce(flat)
            self.bytes += flat.numel() * flat.element_size()
            offset = 0
            for p in group:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def logs(self) -> "ShardLogs":
        return ShardLogs()


class MeanLogs:
    """One process's logs: every value of a key, averaged at the end."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, key: str, value, share: float | None) -> None:
        self.values[key].append(float(value.detach()) if isinstance(value, Tensor) else float(value))

    def next(self) -> None:
        """The next minibatch begins."""

    def result(self) -> dict[str, float]:
        return {key: sum(values) / len(values) for key, values in self.values.items()}


class ShardLogs(MeanLogs):
    """A rank's logs with their shares; `result` gathers every rank's and combines them (a collective)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str, Any, float | None]] = []
        self.slot = 0

    def add(self, key: str, value, share: float | None) -> None:
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(-1).tolist()
            value = value[0] if len(value) == 1 and not key.startswith("stat_") else value
        self.records.append((self.slot, key, value, share))

    def next(self) -> None:
        self.slot += 1

    def result(self) -> dict[str, float]:
        import torch.distributed as dist

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.records)
        return combine_logs(gathered)


def combine_logs(ranks: list[list[tuple[int, str, Any, float | None]]]) -> dict[str, float]:
    """Every rank's (minibatch slot, key, value, share) records → the one-process logs (see the module docstring).

    share None: a value every rank computed alike (rank 0's is taken). ``stat_ev``: [mean, variance] of the critic's
    targets t and of its residuals e over the shard, for ``explained_variance``."""
    entries: dict[tuple[int, str], list[tuple[Any, float | None]]] = defaultdict(list)
    keys: dict[str, None] = {}
    for records in ranks:
        for slot, key, value, share in records:
            entries[(slot, key)].append((value, share))
            keys.setdefault(key, None)
    merged: dict[str, list[float]] = defaultdict(list)
    for (slot, key), got in sorted(entries.items(), key=lambda item: item[0][0]):
        if key.startswith("stat_"):
            continue
        if any(share is None for _, share in got):
            value = got[0][0]
        elif key == "max_ratio":
            value = max(v for v, _ in got)
        elif key == "ESS":  # ESS/n = (Σw)²/Σw²/n, with Σw = n_r·mean_ratio_r and Σw² = n_r·mean_ratio_r²/ESS_r per rank
            ratios = [v for v, _ in entries[(slot, "mean_ratio")]]
            sum_w = sum(s * r for (_, s), r in zip(got, ratios))
            sum_w2 = sum(s * r * r / v for (v, s), r in zip(got, ratios))
            value = sum_w * sum_w / sum_w2
        elif key == "explained_variance":  # torchrl's 1 − var(t − v)/(var(t) + eps), from the shards' means and variances
            parts = entries[(slot, "stat_ev")]
            var_t, var_e = (_pooled_variance([(m[i], m[i + 1], s) for m, s in parts]) for i in (0, 2))
            value = 1.0 - var_e / (var_t + torch.finfo(torch.float32).eps)
        else:
            value = sum(v * s for v, s in got)
        merged[key].append(value)
    return {key: sum(merged[key]) / len(merged[key]) for key in keys if key in merged}


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
    learner.shard = Shard(rank, world)
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
    if rank != 0:
        return {}
    weights = {name: p.detach().cpu() for name, p in generator.denoiser.named_parameters() if p.requires_grad}
    return {"logs": logs, "weights": weights, "rng": _get_rng(device), "allreduce_bytes": shard.bytes}


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

        if cfg.ray.learner_strategy == "fsdp":
            raise UserError("config ray.learner_strategy=fsdp (FSDP2 fully_shard for full fine-tuning) is not implemented "
                            "yet; use ray.learner_strategy=ddp (LoRA / adapter training fits it), see docs/scaling.md")
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
        return {**first["logs"], "allreduce_bytes": first["allreduce_bytes"],
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


def _first_line(err: BaseException | None) -> str:
    if err is None:
        return "its thread ended"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]

