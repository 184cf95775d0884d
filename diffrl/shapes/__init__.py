"""The Shapes world: sampler, palette, renderer and exact detector (below envs and rewards)."""
