"""Environments: the denoising process as a TorchRL env, and the layout sources it draws from."""
