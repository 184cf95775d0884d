"""Policies: the generator (backbone + layout adapter + text), the SDE step, the TorchRL actor, the critic."""

import diffrl.policies.backbones.tiny  # noqa: F401  (registers --model shapes-tiny)
