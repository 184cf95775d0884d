"""Layout-conditioned MM-DiT: diffusers' ``SD3Transformer2DModel`` plus the layout adapter.

The transformer keeps its class and its ``save_pretrained`` format; the adapter's fusers run as
pre-hooks on its ``transformer_blocks`` (see `diffrl.policies.layout_adapter`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.policies.layout_adapter import LayoutAdapter, LayoutAdapterConfig
from diffrl.policies.text import Conditioning


class LayoutMMDiT(nn.Module):
    """v = f(x_t, t, prompt, layout) for an SD3-family transformer."""

    def __init__(self, transformer: nn.Module, adapter: LayoutAdapter):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter
        adapter.attach(transformer.transformer_blocks)
        self.patch_size = transformer.config.patch_size
        self.num_train_timesteps = 1000  # diffusers' flow schedulers feed t·1000 as the timestep

    @classmethod
    def with_new_adapter(cls, transformer: nn.Module, phrase_dim: int, **adapter_kwargs) -> "LayoutMMDiT":
        cfg = LayoutAdapterConfig(
            dim=transformer.inner_dim,
            phrase_dim=phrase_dim,
            num_blocks=len(transformer.transformer_blocks),
            **adapter_kwargs,
        )
        return cls(transformer, LayoutAdapter(cfg))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in the backward pass, its fuser with the grounding of its forward."""
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=self.adapter.checkpointing_func())

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        # x: [B, C, H, W] at flow time sigma [B] in [0, 1]; returns the velocity [B, C, H, W]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        dtype = next(self.transformer.parameters()).dtype
        with self.adapter.grounding(cond.phrase_embeds, cond.boxes, cond.instance_mask, grid):
            return self.transformer(
                hidden_states=x.to(dtype),
                encoder_hidden_states=cond.prompt_embeds.to(dtype),
                pooled_projections=cond.pooled.to(dtype),
                timestep=(sigma * self.num_train_timesteps).to(dtype),
                return_dict=False,
            )[0]


def as_batch_times(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] flow time as a float32 [B] tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
