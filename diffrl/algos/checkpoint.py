"""Checkpoints: one safetensors file per save, written atomically (temp file + rename).

A checkpoint holds the trainable modules' weights, the optimizer state, the iteration counter
and every RNG a continuation depends on (torch's global RNG, the env's noise generator and the
data source's generator), so ``--resume`` picks up where the run stopped. Non-tensor state
(optimizer hyper-parameters, the iteration) goes into the safetensors metadata as JSON.
A file that is not complete never has the final name, so a torn write is never read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

PATTERN = re.compile(r"checkpoint-(\d+)\.safetensors$")


def save_checkpoint(
    folder: Path, iteration: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor], keep: int = 2,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{pid}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    for name, state in rng.items():
        tensors[f"rng.{name}"] = state.cpu().contiguous()
    meta = {"iteration": str(iteration), "param_groups": json.dumps(opt["param_groups"])}
    final = folder / f"checkpoint-{iteration:06d}.safetensors"
    tmp = folder / f".{final.name}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, final)
    for old in sorted(_checkpoints(folder))[:-keep]:
        old[1].unlink()
    return final


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    return [(int(m.group(1)), p) for p in folder.glob("checkpoint-*.safetensors") if (m := PATTERN.search(p.name))]


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(_checkpoints(folder))
    return found[-1][1] if found else None


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore modules and optimizer in place; → (iteration, rng states by name)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, field = key.split(".", 2)
            state.setdefault(int(pid), {})[field] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in json.loads(meta["param_groups"])]  # JSON made tuples (betas) into lists
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return int(meta["iteration"]), rng
