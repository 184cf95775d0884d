"""I-DRUID's lightweight critic φ(s_t): a small MLP on cheap features of the state.

Features: the latent average-pooled to 4×4, the flow time t, and the pooled prompt embedding.
It never runs a copy of the backbone, so it costs nothing next to a denoiser forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict.nn import TensorDictModule
from torch import Tensor, nn

from diffrl.policies.text import ConditionStore

CRITIC_IN_KEYS = ["latent", "sigma", "layout_index"]
POOL = 4


class ValueNet(nn.Module):
    """(x_t, t, layout) → predicted terminal reward [B, 1]."""

    def __init__(self, store: ConditionStore, latent_channels: int, text_dim: int, hidden: int = 256):
        super().__init__()
        self.store = store
        self.mlp = nn.Sequential(
            nn.Linear(latent_channels * POOL * POOL + 1 + text_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, latent: Tensor, sigma: Tensor, layout_index: Tensor) -> Tensor:
        pooled_latent = F.adaptive_avg_pool2d(latent.float(), POOL).flatten(1)  # [B, C·16]
        text = self.store[layout_index].pooled.float()  # [B, P]
        return self.mlp(torch.cat([pooled_latent, sigma.float().reshape(-1, 1), text], dim=1))


def make_critic(net: ValueNet) -> TensorDictModule:
    return TensorDictModule(net, in_keys=CRITIC_IN_KEYS, out_keys=["state_value"])
