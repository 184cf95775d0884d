"""diffrl: reinforcement learning for layout-to-image diffusion and flow-matching models."""

__version__ = "0.1.0"
