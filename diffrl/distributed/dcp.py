"""A learner's state as one flat dict of named tensors, in either of two containers.

`flat_state` names every tensor a continuation needs — each trainable module's state dict as ``<module>.<key>``,
the optimizer's state as ``optimizer.<param id>.<field>`` and the RNG states as ``rng.<name>`` — and puts what is
not a tensor (the iteration, the optimizer's param groups) in a small string dict. `restore_flat` does the reverse.
The same names go into

- one safetensors file (`diffrl.algos.checkpoint`, one process: ``checkpoint-NNNNNN.safetensors``), or
- a ``torch.distributed.checkpoint`` folder (``checkpoint-NNNNNN/``), written by every learner of ``--learners N``
  together (`save_dcp`: replicated tensors once, each by one rank; an FSDP2-sharded tensor as its shards) with
  the strings beside it in ``meta.json``.

Either container loads into any learner count (`read_dcp` reads a folder in one process, whatever N wrote it), so a
run may resume on another N. No pickle in either: ``.distcp`` files hold raw tensor bytes and the folder's
``.metadata`` is read by torch's own loader.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

PATTERN = re.compile(r"checkpoint-(\d+)(\.safetensors)?")  # a file (one process) or a folder (--learners N)


def flat_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
               iteration: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """→ (named tensors on the CPU, string metadata) of a learner at ``iteration``."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{pid}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    for name, state in rng.items():
        tensors[f"rng.{name}"] = state.cpu().contiguous()
    meta = {"iteration": str(iteration), "param_groups": json.dumps(opt["param_groups"])}
    return tensors, meta


def restore_flat(tensors: dict[str, torch.Tensor], meta: dict[str, str], modules: dict[str, nn.Module],
                 optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, torch.Tensor]]:
    """Load modules and optimizer in place from a flat state → (iteration, rng states by name)."""
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


def save_dcp(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every learner calls this with its flat state (a collective): each tensor is written once."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, checkpoint_id=str(folder))


def read_dcp(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``torch.distributed.checkpoint`` folder → (its named tensors, whole, on the CPU; meta.json), in this one
    process (no process group needed), whichever learner count wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in reader.read_metadata().state_dict_metadata.items()
               if isinstance(item, TensorStorageMetadata)}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors, json.loads((folder / "meta.json").read_text())


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete checkpoint in ``folder``, of either container."""
    return [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := PATTERN.fullmatch(p.name))]


def prune(folder: Path, keep: int = 2) -> None:
    """Delete all but the ``keep`` newest checkpoints (files or folders)."""
    for old in sorted(_checkpoints(folder))[:-keep]:
        shutil.rmtree(old[1]) if old[1].is_dir() else old[1].unlink()
