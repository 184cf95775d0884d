"""The exact Shapes detector: finds each instance of a layout in an image, with no learned weights.

Rules, per image:
1. Every pixel takes the nearest of the palette colours and the background (Euclidean RGB), or
   "unknown" when even the nearest is 0.3 or more away.
2. For each colour the layout asks for, the 8-connected components of that colour's pixels
   (components under 3 px dropped) are the candidates; a candidate's box is its pixel bbox.
3. The layout's instances of that colour are matched one-to-one to candidates by Hungarian
   matching on box IoU (SciPy's ``linear_sum_assignment``). Unmatched instances found nothing.
4. Per instance: ``iou`` = IoU(found box, target box). The fit of a shape is the IoU of the
   component's pixels with that shape drawn in the found box; the predicted shape is the best fit;
   ``confidence`` is the detector's class probability of the asked-for shape, a softmax of the fits
   at temperature 0.05 (a clean square ≈ 0.99, a blob between circle and square ≈ 0.5), so that, as
   with Grounding DINO's phrase score, it rewards being recognisably the right shape, not only
   overlapping it; ``success`` = colour found ∧ shape right ∧ IoU ≥ 0.5 (COCO-MIG's per-instance
   test, with the shape check added).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from diffrl.boxes import box_iou
from diffrl.layout import Layout
from diffrl.shapes.world import BACKGROUND, COLORS, SHAPES, parse_phrase, shape_mask

COLOR_TOLERANCE = 0.4
SHAPE_TEMPERATURE = 0.05  # softmax temperature over the shape fits (rule 4)
MIN_COMPONENT_PIXELS = 3
_PALETTE = torch.tensor([*COLORS.values(), BACKGROUND])  # [C+1, 3]; the last row is the background
_COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class Detections:
    """Per-instance results padded to K = the batch's largest instance count."""

    iou: Tensor  # [B, K] IoU of the found box with the target box (0: nothing found)
    confidence: Tensor  # [B, K] shape confidence in [0, 1]
    color_ok: Tensor  # [B, K] bool, an object of the asked-for colour was matched
    shape_ok: Tensor  # [B, K] bool, its shape is the asked-for shape
    success: Tensor  # [B, K] bool, color_ok ∧ shape_ok ∧ iou ≥ 0.5
    boxes: Tensor  # [B, K, 4] found boxes, normalised xyxy (zeros: nothing found)
    mask: Tensor  # [B, K] bool, real instance (False: padding)


def classify_pixels(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] → [B, H, W] palette index (len(COLORS) = background, -1 = unknown)."""
    dist = torch.cdist(images.permute(0, 2, 3, 1).reshape(-1, 3).float(), _PALETTE)  # [BHW, C+1]
    best, index = dist.min(dim=1)
    index[best >= COLOR_TOLERANCE] = -1
    return index.view(images.shape[0], *images.shape[2:])


def components(pixels: np.ndarray) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """Components of a bool [H, W] mask: (mask, normalised bbox) for those of ≥ MIN_COMPONENT_PIXELS."""
    labels, count = ndimage.label(pixels, structure=_EIGHT_CONNECTED)
    h, w = pixels.shape
    out = []
    for i, found in enumerate(ndimage.find_objects(labels), start=1):
        component = labels == i
        if component.sum() < MIN_COMPONENT_PIXELS:
            continue
        rows, cols = found
        out.append((component, (cols.start / w, rows.start / h, cols.stop / w, rows.stop / h)))
    return out


def detect(images: Tensor, layouts: Sequence[Layout]) -> Detections:
    images = images.detach().float().cpu()
    b, k = len(layouts), max(layout.n for layout in layouts)
    size = images.shape[-1]
    iou = torch.zeros(b, k)
    confidence = torch.zeros(b, k)
    color_ok = torch.zeros(b, k, dtype=torch.bool)
    shape_ok = torch.zeros(b, k, dtype=torch.bool)
    found_boxes = torch.zeros(b, k, 4)
    mask = torch.zeros(b, k, dtype=torch.bool)
    classes = classify_pixels(images).numpy()
    for i, layout in enumerate(layouts):
        mask[i, : layout.n] = True
        parsed = [parse_phrase(p) for p in layout.phrases]
        targets = torch.tensor(layout.boxes)
        for color in dict.fromkeys(c for c, _ in parsed):
            wanted = [j for j, (c, _) in enumerate(parsed) if c == color]
            candidates = components(classes[i] == _COLOR_INDEX[color])
            if not candidates:
                continue
            cand_boxes = torch.tensor([box for _, box in candidates])
            ious = box_iou(targets[wanted], cand_boxes)  # [len(wanted), len(candidates)]
            rows, cols = linear_sum_assignment(ious.numpy(), maximize=True)
            for r, c in zip(rows, cols):
                j = wanted[r]
                component = torch.from_numpy(candidates[c][0])
                fits = shape_fits(component, cand_boxes[c], size)  # [S]
                asked = SHAPES.index(parsed[j][1])
                iou[i, j] = ious[r, c]
                confidence[i, j] = shape_confidence(fits)[asked]
                color_ok[i, j] = True
                shape_ok[i, j] = int(fits.argmax()) == asked
                found_boxes[i, j] = cand_boxes[c]
    success = color_ok & shape_ok & (iou >= 0.5)
    return Detections(iou, confidence, color_ok, shape_ok, success, found_boxes, mask)


def shape_fits(component: Tensor, box: Tensor, size: int) -> Tensor:
    """[S] IoU of a component's pixels (bool [H, W]) with each of SHAPES drawn in its box [4]."""
    return torch.tensor([mask_iou(component, shape_mask(s, box[None], size)[0]) for s in SHAPES])


def shape_confidence(fits: Tensor) -> Tensor:
    """[S] the class probability of each shape: softmax(fits / SHAPE_TEMPERATURE)."""
    return torch.softmax(fits / SHAPE_TEMPERATURE, dim=-1)


def mask_iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0
