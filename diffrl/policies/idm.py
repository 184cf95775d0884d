"""I-DRUID's Instance-Disentangled Module (IDM) and its Disentangled Constraint (IDC loss), backbone-agnostic.

IDM takes the n+1 *enhanced features* of a layout — one per instance plus one global — and the layout
masks, and computes channel weights α that split every feature in two::

    E : [N, m, C, H, W]  m = n + 1 features (n instances, then the global one)
    M : [N, m, H, W]     1 inside instance i's box, 0 outside; all ones for the global feature
    α = IDM(E, M) : [N, m, C]       R⁺ = α ⊙ E  (semantically relevant),  R⁻ = (1 − α) ⊙ E  (spurious)

The two branches (the paper names Conv / AvgPool / FC / Softmax, nothing more; the sizes are ours):

* feature branch: depthwise 3×3 conv → SiLU → average pool *inside the feature's own mask* → [C]
  (depthwise, so that it costs 9·C weights even at SD3.5's C = 1536);
* mask branch:    3×3 conv of the mask (1 → 16 channels) → SiLU → global average pool → [16]
  (what the box looks like: its area, its edges);
* FC(C + 16 → hidden) → SiLU → FC(hidden → C) gives logits [N, m, C]; α = softmax over the m
  features (padded instances excluded), per channel: the features of a layout compete for each channel.

The last FC starts at zero, so a fresh IDM has α = 1/m everywhere: a consumer that fuses ``m · Σ_i R⁺_i``
(the layout adapter does) gets exactly ``Σ_i E_i`` — switching IDM on for a trained adapter starts from
the same model.

IDC: for attention maps ``R_CA`` that the features trigger (one map per instance; how they are obtained is
the backbone's business — see `diffrl.policies.layout_adapter` for the MM-DiT) the Cross-Attention Score ::

    CAS(R_CA, M) = Σ_i Σ_p |R_CA,i[p] − AVG_i| · (1 − M_i[p])
    AVG_i        = Σ_p R_CA,i[p]·(1 − M_i[p]) / Σ_p (1 − M_i[p])

is the dispersion of each instance's map outside its box (i over real instances, p over map positions);
``AVG`` is the mean over the outside positions (the paper's ``AVG(R ⊙ (1 − M))``, read as "the average
of the map outside the box"; an instance whose box covers every position contributes 0). Then ::

    L_dis = Softplus(CAS(R⁺_CA, M) − CAS(R⁻_CA, M))

per sample, averaged over the batch: minimising it asks the relevant part R⁺ to trigger a tighter map
than the spurious part R⁻. Both functions are pure and differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_CHANNELS = 16  # width of the mask branch


class InstanceDisentangler(nn.Module):
    """IDM: (E [N, m, C, H, W], M [N, m, H, W], valid [N, m]) → α [N, m, C], softmax over the valid features."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(channels // 4, MASK_CHANNELS)
        self.feature_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.mask_conv = nn.Conv2d(1, MASK_CHANNELS, 3, padding=1)
        self.fc = nn.Sequential(nn.Linear(channels + MASK_CHANNELS, hidden), nn.SiLU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.fc[-1].weight)  # α = 1/m at init (see the module docstring)
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, features: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        # features: [N, m, C, H, W]; masks: [N, m, H, W] in {0, 1}; valid: [N, m] bool (False: padding)
        n, m, c, h, w = features.shape
        masks = masks.to(features.dtype)
        feat = F.silu(self.feature_conv(features.reshape(n * m, c, h, w))).view(n, m, c, h, w)
        area = masks.sum(dim=(-2, -1)).clamp(min=1.0)  # [N, m]
        feat = (feat * masks[:, :, None]).sum(dim=(-2, -1)) / area[..., None]  # [N, m, C] pooled in the mask
        shape = F.silu(self.mask_conv(masks.reshape(n * m, 1, h, w))).mean(dim=(-2, -1)).view(n, m, -1)
        logits = self.fc(torch.cat([feat, shape], dim=-1))  # [N, m, C]
        logits = logits.masked_fill(~valid[..., None], float("-inf"))
        return torch.softmax(logits, dim=1)


def split(alpha: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """α [N, m, C] and E [N, m, C, *spatial] → (R⁺ = α ⊙ E, R⁻ = (1 − α) ⊙ E), each shaped like E."""
    a = alpha.reshape(*alpha.shape, *([1] * (features.ndim - alpha.ndim)))
    return a * features, (1 - a) * features


def cross_attention_score(maps: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
    """CAS per sample: maps [N, n, H, W], masks [N, n, H, W] (1 in the box), valid [N, n] bool → [N]."""
    outside = (1 - masks.to(maps.dtype)) * valid[..., None, None].to(maps.dtype)  # [N, n, H, W]
    count = outside.sum(dim=(-2, -1)).clamp(min=1.0)  # [N, n]
    avg = (maps * outside).sum(dim=(-2, -1)) / count  # [N, n] mean of the map outside the box
    return ((maps - avg[..., None, None]).abs() * outside).sum(dim=(-3, -2, -1))


def disentangle_loss(maps_pos: Tensor, maps_neg: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
    """L_dis = mean over the batch of Softplus(CAS(R⁺_CA) − CAS(R⁻_CA)); maps [N, n, H, W] → scalar."""
    gap = cross_attention_score(maps_pos, masks, valid) - cross_attention_score(maps_neg, masks, valid)  # [N]
    return F.softplus(gap).mean()
