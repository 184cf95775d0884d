"""COCO-MIG's metrics, per level (instance count) and pooled over all instances.

Per instance, success = IoU ≥ 0.5 with its box and the right attributes (colour; here shape too).
ISR  = successes / instances.
mIoU = mean per-instance IoU, where an instance that fails its attribute check counts 0.

`summarize` also counts where the instances that fail, fail, in COCO-MIG's order of checks (``verdicts``):
``missed`` (no detection of the phrase matched it), ``wrong box`` (matched, IoU < 0.5) and ``wrong attribute``
(in its box, an attribute wrong: in the Shapes world the shape, since a match already has the right colour;
a grounded reward's verdict has no attribute check beyond the match, so it counts none here).
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


def summarize(outputs: Sequence[RewardOutput], layouts: Sequence[Layout]) -> dict:
    """Concatenate per-batch reward outputs (with per-instance info) → the summary block ``M``."""
    k = max(out.info["instance_mask"].shape[1] for out in outputs)

    def cat(key: str) -> Tensor:
        return torch.cat([torch.nn.functional.pad(out.info[key].cpu(), (0, k - out.info[key].shape[1]))
                          for out in outputs])[: len(layouts)]

    rewards = torch.cat([out.rewards.cpu() for out in outputs])[: len(layouts)]
    attr_ok = cat("color_ok") & cat("shape_ok")
    metrics = instance_metrics(cat("success"), cat("iou"), attr_ok, cat("instance_mask"), [l.n for l in layouts])
    return {"isr": metrics["isr"], "miou": metrics["miou"], "reward": float(rewards.mean()),
            "per_level": metrics["per_level"],
            "verdicts": verdict_counts(cat("success"), cat("iou"), cat("color_ok"), attr_ok, cat("instance_mask"))}


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
