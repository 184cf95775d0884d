"""COCO-MIG's metrics, per level (instance count) and pooled over all instances.

Per instance, success = IoU ≥ 0.5 with its box and the right attributes (colour; here shape too).
ISR  = successes / instances.
mIoU = mean per-instance IoU, where an instance that fails its attribute check counts 0.

`summarize` also counts where the instances that fail, fail, in COCO-MIG's order of checks (``verdicts``):
``missed`` (no detection of the phrase matched it), ``wrong box`` (matched, IoU < 0.5) and ``wrong attribute``
(in its box, an attribute wrong: in the Shapes world the shape, since a match already has the right colour;
a grounded reward's verdict has no attribute check beyond the match, so it counts none here).

What a reward's ``info`` enables (the contract is in `diffrl.rewards.base`): ``success``, ``iou`` and
``instance_mask`` [B, K] give ISR, mIoU and the verdicts; ``color_ok`` / ``shape_ok`` [B, K] add the attribute
check (absent: no attribute is judged wrong) and ``found`` [B, K] splits missed from wrong box (absent: an
instance with IoU 0 counts as missed). A reward without the three required fields (one that returns per-image
scores only) is summarised by its reward alone: ``isr``, ``miou`` and ``verdicts`` are None and ``note`` says why.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from diffrl.layout import Layout
from diffrl.rewards.base import RewardOutput


def instance_metrics(success: Tensor, iou: Tensor, attr_ok: Tensor, mask: Tensor, levels: Sequence[int]) -> dict:
    """success, iou, attr_ok, mask: [B, K]; levels: instance count per image → ISR/mIoU pooled and per level."""
    success, attr_ok, mask = success.bool().cpu(), attr_ok.bool().cpu(), mask.bool().cpu()
    iou = (iou.float().cpu() * attr_ok)
    levels_t = torch.tensor(list(levels))

    def block(rows: Tensor) -> dict:
        m = mask[rows]
        n = int(m.sum())
        return {"isr": float(success[rows][m].float().mean()) if n else 0.0,
                "miou": float(iou[rows][m].mean()) if n else 0.0,
                "instances": n}

    everything = block(torch.ones(len(levels_t), dtype=torch.bool))
    per_level = {f"L{lv}": block(levels_t == lv) for lv in sorted(set(levels_t.tolist()))}
    return {"isr": everything["isr"], "miou": everything["miou"], "per_level": per_level}


VERDICT_FIELDS = ("success", "iou", "instance_mask")  # the info fields ISR / mIoU need
REWARD_ONLY = ("the reward gives per-image scores only (no info fields success, iou, instance_mask): ISR, mIoU and "
               "verdicts are not measured, the reward alone is")


def concat_info(outputs: Sequence[RewardOutput], key: str, n: int) -> Tensor:
    """One per-instance ``info[key]`` of per-batch reward outputs → [n, K] on the CPU, each batch's [b, k] padded to
    the largest instance count K (padding: 0 / False)."""
    k = max(out.info[key].shape[1] for out in outputs)
    return torch.cat([torch.nn.functional.pad(out.info[key].cpu(), (0, k - out.info[key].shape[1]))
                      for out in outputs])[:n]


def summarize(outputs: Sequence[RewardOutput], layouts: Sequence[Layout]) -> dict:
    """Concatenate per-batch reward outputs (with per-instance info) → the summary block ``M``."""
    if not all(key in out.info for out in outputs for key in VERDICT_FIELDS):
        return summarize_rewards(outputs, layouts)
    def cat(key: str) -> Tensor:
        return concat_info(outputs, key, len(layouts))

    rewards = torch.cat([out.rewards.cpu() for out in outputs])[: len(layouts)]
    mask = cat("instance_mask").bool()
    every = torch.ones_like(mask)
    info = outputs[0].info
    color_ok = cat("color_ok").bool() if "color_ok" in info else every
    attr_ok = color_ok & (cat("shape_ok").bool() if "shape_ok" in info else every)
    found = cat("found").bool() if "found" in info else (color_ok if "color_ok" in info else cat("iou") > 0)
    metrics = instance_metrics(cat("success"), cat("iou"), attr_ok, mask, [l.n for l in layouts])
    return {"isr": metrics["isr"], "miou": metrics["miou"], "reward": float(rewards.mean()),
            "per_level": metrics["per_level"],
            "verdicts": verdict_counts(cat("success"), cat("iou"), found, attr_ok, mask)}


def instance_success(outputs: Sequence[RewardOutput], n: int) -> Tensor | None:
    """Each instance's verdict of per-batch reward outputs: [n, K] bool, True where the instance succeeded (padding:
    False); None for a reward with per-image scores only. The verdicts `summarize` counts, kept for the pictures."""
    if not all(key in out.info for out in outputs for key in VERDICT_FIELDS):
        return None
    return concat_info(outputs, "success", n).bool() & concat_info(outputs, "instance_mask", n).bool()


def scalars(metrics: dict) -> dict[str, float]:
    """A summary block ``M`` as flat scalars for TensorBoard: ``isr``, ``miou``, ``reward``, ``L<n>/<field>`` and
    ``verdicts/<name>`` (spaces as underscores); what was not measured (None) is left out."""
    flat = {key: metrics[key] for key in ("isr", "miou", "reward") if metrics.get(key) is not None}
    for level, block in (metrics.get("per_level") or {}).items():
        flat.update({f"{level}/{key}": value for key, value in block.items() if isinstance(value, (int, float))})
    flat.update({f"verdicts/{name.replace(' ', '_')}": count for name, count in (metrics.get("verdicts") or {}).items()})
    return flat


def summarize_rewards(outputs: Sequence[RewardOutput], layouts: Sequence[Layout]) -> dict:
    """The summary block of a reward without per-instance verdicts: its mean, pooled and per level, and a note."""
    rewards = torch.cat([out.rewards.detach().float().cpu() for out in outputs])[: len(layouts)]
    levels = torch.tensor([layout.n for layout in layouts])
    per_level = {f"L{lv}": {"reward": float(rewards[levels == lv].mean()), "layouts": int((levels == lv).sum())}
                 for lv in sorted(set(levels.tolist()))}
    return {"isr": None, "miou": None, "reward": float(rewards.mean()), "per_level": per_level, "verdicts": None,
            "note": REWARD_ONLY}


def verdict_counts(success: Tensor, iou: Tensor, found: Tensor, attr_ok: Tensor, mask: Tensor,
                   attribute: str = "wrong attribute") -> dict[str, int]:
    """[B, K] per-instance verdicts → instance counts {"ok", "missed", "wrong box", ``attribute``} (they sum to the
    instance count; ``found``: a detection of the phrase was matched to the instance; ``attribute`` names the
    attribute failure, "wrong colour" for COCO-MIG's judge)."""
    success, found, attr_ok, mask = (t.bool().cpu() for t in (success, found, attr_ok, mask))
    box_ok = iou.float().cpu() >= 0.5
    counts = {"ok": success & mask, "missed": ~found & mask, "wrong box": found & ~box_ok & mask,
              attribute: found & box_ok & ~attr_ok & mask}
    return {name: int(rows.sum()) for name, rows in counts.items()}
