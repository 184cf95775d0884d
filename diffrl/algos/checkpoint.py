"""Checkpoints: one safetensors file per save, written atomically (temp file, fsync, rename) — or, with
``--learners N``, one `torch.distributed.checkpoint` folder of the same named tensors that the N learners write
together and that appears under its final name once complete (`diffrl.distributed.learners`); either loads here.

A checkpoint holds everything that defines the continuation of a run: the trainable modules' weights
(the denoiser or its adapter, and PPO's critic), the optimizer state (its moments and step counts, and
its param groups, learning rates included — the learning rate is constant, there is no schedule to
save), the iteration counter, and every RNG (`capture_rng`): torch's global RNG (the learner's
minibatch order and, on the CPU, the policy's sampling noise), the CUDA RNG of the run's device when it
has one (the policy's sampling noise on a GPU), the env's initial-noise generator and the data source's
position (its generator, and a JSONL source's pending order). Rollouts on Ray draw their noise from
seeds made from (seed, iteration, chunk), so they add no state. Non-tensor state (param groups, the
iteration) goes into the safetensors metadata as JSON. No pickle anywhere: loading runs no code.
A file that is not complete never has the final name, so a torn write is never read; a stale
temporary file left by a kill is removed when the run resumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffrl.distributed.dcp import _checkpoints, flat_state, prune, read_dcp, restore_flat
from diffrl.files import atomic_write

def save_checkpoint(
    folder: Path, iteration: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor], keep: int = 2,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = flat_state(modules, optimizer, rng, iteration)
    final = folder / f"checkpoint-{iteration:06d}.safetensors"
    atomic_write(final, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    prune(folder, keep)
    return final


def remove_stale(folder: Path) -> None:
    """Delete temporary files an interrupted save left (only when resuming: a live run may be writing one)."""
    for stale in folder.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint."""
    found = sorted(_checkpoints(folder))
    return found[-1][1] if found else None


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore modules and optimizer in place from a checkpoint file, or from a `torch.distributed.checkpoint`
    folder that ``--learners N`` wrote (whatever N); → (iteration, rng states by name)."""
    return restore_flat(*read_checkpoint(path), modules, optimizer)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's named tensors and string metadata, from its file or its `torch.distributed.checkpoint` folder."""
    if path.is_dir():
        return read_dcp(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def capture_rng(env_noise: torch.Generator, source, device: torch.device) -> dict[str, torch.Tensor]:
    """Every RNG state the continuation of a run depends on, by name (see the module docstring)."""
    rng = {"torch": torch.get_rng_state(), "env_noise": env_noise.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if hasattr(source, "state_dict"):
        rng.update({f"data.{k}": v for k, v in source.state_dict().items()})
    return rng


def restore_rng(rng: dict[str, torch.Tensor], env_noise: torch.Generator, source, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    env_noise.set_state(rng["env_noise"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    data = {k[len("data."):]: v for k, v in rng.items() if k.startswith("data.")}
    if data:
        source.load_state_dict(data)
    elif "data" in rng:  # checkpoints written before the source's whole state was kept
        source.generator.set_state(rng["data"])
