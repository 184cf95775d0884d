"""Pairwise geometry of normalised xyxy boxes: IoU, generalized IoU, mean L1 distance; and NMS.

A leaf module like `diffrl.layout` (imports nothing of diffrl), shared by the Shapes detector and the rewards.

Each takes a [N, 4] and b [M, 4] and returns [N, M].
    IoU(A, B)  = |A ∩ B| / |A ∪ B|                                  ∈ [0, 1]
    GIoU(A, B) = IoU(A, B) − (|C| − |A ∪ B|) / |C|, C the smallest box enclosing A and B
                 (Rezatofighi et al., CVPR 2019)                     ∈ [−1, 1]
    L1(A, B)   = mean over the 4 coordinates of |A − B|             ∈ [0, 1] for normalised boxes

`nms` (non-maximum suppression) takes boxes [N, 4] with scores [N] and returns the indices it keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_and_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    top_left = a[:, None, :2].maximum(b[None, :, :2])
    bottom_right = a[:, None, 2:].minimum(b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter, _area(a)[:, None] + _area(b)[None, :] - inter


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _intersection_and_union(a, b)
    return inter / union.clamp(min=1e-12)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _intersection_and_union(a, b)
    top_left = a[:, None, :2].minimum(b[None, :, :2])
    bottom_right = a[:, None, 2:].maximum(b[None, :, 2:])
    enclosing = (bottom_right - top_left).prod(-1)
    return inter / union.clamp(min=1e-12) - (enclosing - union) / enclosing.clamp(min=1e-12)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    return (a[:, None, :] - b[None, :, :]).abs().mean(-1)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression with the semantics of ``torchvision.ops.nms``: visiting boxes from the
    highest score down, a box is dropped when its IoU with an already kept box exceeds ``iou_threshold``.
    boxes [N, 4] xyxy, scores [N] → indices [M] of the kept boxes, highest score first (ties: lower index first)."""
    order = scores.argsort(descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])  # [N, N]
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]
