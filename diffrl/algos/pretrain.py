"""`diffrl pretrain`: train the tiny Shapes generator from scratch by flow matching on rendered pairs.

Few-instance layouts only (L1–L3 by default), so that RL later has real headroom on many-instance
layouts — the cross-scenario gap I-DRUID targets. AdamW with warm-up and cosine decay, gradient
clipping, and an exponential moving average of the weights, which is what gets saved.
The result is a generator folder (`LayoutGenerator.save_pretrained`) that ``--model`` accepts;
``--init`` continues from such a folder or a registered model (a new warm-up and cosine schedule).

``--idm`` gives the layout adapter I-DRUID's Instance-Disentangled Module and trains on
``L = L_ldm + λ_dis·L_dis`` (``--dis-coef``), L_dis from the same forward as L_ldm. With ``--init`` a folder
without IDM gets a fresh one, which starts as the identity (`diffrl.policies.idm`), so training continues
from the same model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffrl.algos.sft import flow_matching_loss
from diffrl.errors import UserError
from diffrl.eval.evaluate import evaluate, held_out_layouts
from diffrl.policies.backbones.tiny import build_tiny_generator
from diffrl.policies.generator import load_generator
from diffrl.rewards.shapes import ShapesReward
from diffrl.shapes.world import loosen, mislabel, render, sample_layouts


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"  # folder the generator is saved to
    steps: int = 4000  # optimiser steps
    batch_size: int = 64  # rendered pairs per step
    levels: tuple = (1, 2, 3)  # instance counts of the training layouts
    lr: float = 1e-3  # peak learning rate
    warmup: int = 200  # linear warm-up steps
    ema: float = 0.999  # EMA decay of the saved weights
    seed: int = 0  # seed of initialisation, data and noise
    eval_every: int = 1000  # steps between quick evaluations (0: none)
    eval_layouts: int = 120  # held-out L1–L3 layouts for those evaluations
    num_steps: int = 10  # sampling steps used by the evaluations
    init: str = ""  # continue from this generator (registered name or folder) instead of a fresh model
    idm: bool = False  # give the layout adapter I-DRUID's IDM and train with its L_dis
    dis_coef: float = 0.1  # λ_dis: weight of L_dis when idm (ignored without)
    world: str = "classic"  # box rules of the training and evaluation layouts (diffrl.shapes.world.WORLDS)
    loose: float = 0.0  # condition on boxes grown by up to this fraction of their size per side (0: exact boxes)
    shift: float = 0.0  # condition on boxes moved by this many grid cells right and down (0: exact boxes)
    mislabel: float = 0.0  # condition on phrases whose colour word is swapped for its look-alike with this probability


def pretrain(cfg: PretrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    model = load_generator(cfg.init) if cfg.init else build_tiny_generator(seed=cfg.seed)
    if model.space.kind != "pixels":
        raise UserError(f"--init {cfg.init}: diffrl pretrain trains the Shapes world's pixel-space generator; fine-tune "
                        "a latent-space model with `diffrl train --model ... --algo sft` instead")
    adapter = getattr(model.denoiser, "adapter", None)
    if cfg.idm and adapter is None:
        raise UserError(f"--idm: --init {cfg.init} has no layout adapter to carry IDM (a GLIGEN checkpoint grounds "
                        "with its own fusers); start from a model with a diffrl layout adapter")
    if cfg.idm:
        adapter.enable_idm()
    dis_coef = cfg.dis_coef if adapter is not None and adapter.config.idm else 0.0
    ema = copy.deepcopy(model.denoiser).requires_grad_(False)
    params = list(model.denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)),
    )
    data_rng = torch.Generator().manual_seed(cfg.seed)
    noise_rng = torch.Generator().manual_seed(cfg.seed + 1)
    reward = ShapesReward()
    held_out = held_out_layouts(cfg.eval_layouts, cfg.levels, seed=10_000 + cfg.seed, world=cfg.world)
    box_rng = torch.Generator().manual_seed(cfg.seed + 2)
    log = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain")
    for step in bar:
        layouts = sample_layouts(cfg.batch_size, list(cfg.levels), generator=data_rng, world=cfg.world)
        x0 = model.space.encode(render(layouts, size=model.space.image_size))
        shown = loosen(layouts, cfg.loose, box_rng, cfg.shift) if cfg.loose or cfg.shift else layouts  # what it is told
        shown = mislabel(shown, cfg.mislabel, box_rng) if cfg.mislabel else shown
        ldm = flow_matching_loss(model, x0, model.encode_layouts(shown), generator=noise_rng)
        dis = model.denoiser.adapter.last_dis if dis_coef else None  # of the same forward
        loss = ldm + dis_coef * dis if dis is not None else ldm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), params):
                p_ema.lerp_(p, 1 - decay)
        losses = {"loss": ldm.item(), **({"loss_dis": dis.item()} if dis is not None else {})}
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            metrics = _evaluate_ema(model, ema, reward, held_out, cfg)
            entry = {"step": step + 1, **losses, "seconds": time.time() - start, **metrics}
            log.append(entry)
            bar.write(json.dumps(entry))
    model.denoiser.load_state_dict(ema.state_dict())
    model.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"config": asdict(cfg), "log": log}, indent=2) + "\n")
    return out


def _evaluate_ema(model, ema, reward, layouts, cfg: PretrainConfig) -> dict:
    live = copy.deepcopy(model.denoiser.state_dict())
    model.denoiser.load_state_dict(ema.state_dict())
    metrics, _ = evaluate(model, reward, layouts, num_steps=cfg.num_steps, progress=False)
    model.denoiser.load_state_dict(live)
    return {"isr": metrics["isr"], "miou": metrics["miou"], "reward": metrics["reward"]}
