"""Loading never runs code from a file: weights through safetensors (or torch.load(weights_only=True)), YAML
through the safe loader, no trust_remote_code; Ray's dashboard off, or on loopback only; the reward
package importable without Ray."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffrl
from diffrl.algos.checkpoint import load_checkpoint
from diffrl.config import build_config, load_yaml
from diffrl.errors import UserError

SOURCES = sorted(Path(diffrl.__file__).parent.rglob("*.py"))


class Payload:
    """Unpickling this creates a file: proof that a loader executed code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_no_loader_in_diffrl_can_execute_code_from_a_file():
    offences = []
    for path in SOURCES:
        text = path.read_text()
        for call in re.finditer(r"torch\.load\((.*?)\)", text, re.S):
            if "weights_only=True" not in call.group(1):
                offences.append(f"{path.name}: torch.load without weights_only=True")
        for pattern in (r"\bpickle\.loads?\(", r"yaml\.(unsafe_|full_)?load\(", r"yaml\.load_all\(",
                        r"trust_remote_code\s*=\s*True", r"\bUnpickler\("):
            if re.search(pattern, text):
                offences.append(f"{path.name}: {pattern}")
    assert SOURCES and not offences, offences


def test_a_pickle_posing_as_a_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    fake = tmp_path / "checkpoint-000001.safetensors"
    fake.write_bytes(pickle.dumps({"denoiser.weight": Payload(marker)}))
    module = torch.nn.Linear(2, 2)
    with pytest.raises(Exception):
        load_checkpoint(fake, {"denoiser": module}, torch.optim.AdamW(module.parameters()))
    assert not marker.exists()


def test_a_yaml_config_with_python_tags_is_a_user_error_and_runs_nothing(tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(f"iterations: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(config)
    assert not marker.exists()


def test_ray_dashboard_is_off_by_default_and_loopback_only_when_asked(monkeypatch):
    import ray

    from diffrl.distributed.ray_workers import start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert start_ray(build_config(overrides=[("ray.workers", 1)]))
    assert start_ray(build_config(overrides=[("ray.workers", 1), ("ray.dashboard", True)]))
    assert calls[0]["address"] == "local"  # a fresh local instance, not whatever cluster runs on the machine
    assert calls[0]["include_dashboard"] is False and calls[0]["dashboard_host"] == "127.0.0.1"
    assert calls[1]["include_dashboard"] is True and calls[1]["dashboard_host"] == "127.0.0.1"


def test_the_reward_package_with_its_remote_and_guard_parts_imports_without_ray():
    code = ("import sys, diffrl.rewards, diffrl.rewards.remote, diffrl.rewards.guard; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
