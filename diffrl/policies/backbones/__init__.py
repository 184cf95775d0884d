"""Backbones a layout policy can be built on: the MM-DiT (SD3 family) and its tiny embedded instance."""
