"""Under ``ray.learner_strategy=fsdp``: does FSDP2 (``fully_shard``) on gloo give one process's gradient?

    python experiments/fsdp2_gloo.py [--model shapes-tiny] [--learners 2] [--json PATH]

The denoiser (``policy.train=all``: full fine-tuning) is built in this process and in N gloo processes
(torch.multiprocessing, no Ray); each child shards it FSDP2's way — every block of every top-level ModuleList
(MM-DiT blocks, the layout adapter's fusers) as a unit, then the root — and backpropagates its own rows of one batch
(a mean-square loss weighed by its share of the rows). The reduce-scattered gradient, gathered whole, is compared with
this process's: the same rows, piece by piece, the gradients summed in float64 as `diffrl.distributed.learners.GradSum`
does. What it found on 2026-12-08 (shapes-tiny, 2 learners): every one of the 192 parameters gets a gradient, and they
agree to 3e-8 (not bit for bit) once two gloo limits are handled — gloo has no ``PREMUL_SUM``, so
``set_gradient_divide_factor(1.0)`` (sum, not mean: diffrl weighs each piece by its share) needs
``set_force_sum_reduction_for_comms(True)``, and both are set per FSDP module, not once on the root (on the root alone
the blocks' gradients came back halved).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _results import add_json_option, write_json


def build(model: str):
    from diffrl.config import build_config
    from diffrl.policies.generator import build_generator

    torch.manual_seed(0)
    cfg = build_config({"model": {"name": model}, "policy": {"train": "all"}})
    return build_generator(cfg.model, cfg.policy.train)


def batch(generator, rows: int = 4):
    from diffrl.shapes.world import sample_layouts

    cond = generator.encode_layouts(sample_layouts(rows, [2, 3], seed=0))
    torch.manual_seed(2)
    return torch.randn(rows, *generator.latent_shape), torch.rand(rows), cond


def pieces(rows: int, world: int) -> list[torch.Tensor]:
    return list(torch.arange(rows).chunk(world))


def loss(denoiser, x, t, cond, rows, total: int):
    return denoiser(x[rows], t[rows], cond[rows]).pow(2).mean() * (len(rows) / total)


def shard(denoiser, world: int) -> None:
    """Sharded as ``ray.learner_strategy=fsdp`` shards it (`diffrl.distributed.learners.shard_blocks`)."""
    from torch.distributed.device_mesh import init_device_mesh

    from diffrl.distributed.learners import shard_blocks

    shard_blocks(denoiser, init_device_mesh("cpu", (world,)), sum_gradients=True)


def child(rank: int, world: int, model: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    generator = build(model)
    x, t, cond = batch(generator)
    shard(generator.denoiser, world)
    loss(generator.denoiser, x, t, cond, pieces(len(x), world)[rank], len(x)).backward()
    grads = {n: p.grad.full_tensor() for n, p in generator.denoiser.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--learners", type=int, default=2)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = build(args.model)
    x, t, cond = batch(generator)
    params = list(generator.denoiser.parameters())
    names = [n for n, _ in generator.denoiser.named_parameters()]
    total: dict[str, torch.Tensor] = {}
    for rows in pieces(len(x), args.learners):
        generator.denoiser.zero_grad(set_to_none=True)
        loss(generator.denoiser, x, t, cond, rows, len(x)).backward()
        for n, p in zip(names, params):
            if p.grad is not None:
                total[n] = total[n] + p.grad.double() if n in total else p.grad.double()
    one = {n: g.float() for n, g in total.items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(child, args=(args.learners, args.model, port, out), nprocs=args.learners)
        sharded = torch.load(out)
    diff = max(float((sharded[n] - one[n]).abs().max()) for n in one)
    exact = sum(torch.equal(sharded[n], one[n]) for n in one)
    print(f"{args.model}, {args.learners} FSDP2 learners on gloo: {len(sharded)} of {len(one)} parameters with a "
          f"gradient, max |difference| {diff:.3g} from one process, {exact} of them bit for bit")
    write_json(args, __file__, parameters=len(one), with_gradient=len(sharded), max_abs_difference=diff,
               bit_identical=exact)


if __name__ == "__main__":
    main()
