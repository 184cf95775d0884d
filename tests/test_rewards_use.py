"""Rewards as other projects use them: a cheap import, the DDPO / Flow-GRPO call signature, and the
plain-PyTorch example (run, so it cannot rot)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffrl.rewards import CycleConsistencyReward, GroundingDinoReward, build_reward
from diffrl.shapes.world import render, sample_layouts

ROOT = Path(__file__).resolve().parents[1]


def python(code_or_file, *args):
    # One thread: the example's tiny tensors only lose from more, and a busy 2-core machine makes that worse.
    return subprocess.run([sys.executable, code_or_file, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_import_is_cheap():
    code = ("import sys, diffrl.rewards; "
            "print(sorted(m for m in ('transformers', 'ray', 'scipy', 'diffrl.envs', 'diffrl.policies', 'diffrl.algos') "
            "if m in sys.modules))")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("make", [
    lambda: GroundingDinoReward(grounder="shapes"),
    lambda: CycleConsistencyReward(distance="giou", grounder="shapes"),
    lambda: build_reward("shapes=1,cycle=0.5", model="shapes"),
])
def test_ddpo_fn_reads_tensors_uint8_numpy_and_pil_with_layouts_in_metadata(make):
    layouts = sample_layouts(3, [2, 3], seed=2)
    images = render(layouts)
    reward = make()
    expected = reward(images, layouts)
    fn = reward.as_ddpo_fn()
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(a) for a in uint8]
    metadata = [{"layout": layouts[0]}, {"layout": layouts[1].to_dict()}, {"layout": layouts[2]}]
    for batch in (images, uint8, pil):
        rewards, info = fn(batch, [l.prompt for l in layouts], metadata)
        assert rewards.dtype == torch.float32 and rewards.shape == (3,)
        torch.testing.assert_close(rewards, expected.rewards)
        assert set(info) == set(expected.info) and all(v.device.type == "cpu" for v in info.values())


def test_the_plain_pytorch_example_runs_learns_and_uses_no_other_part_of_diffrl():
    code = ("import runpy, sys; runpy.run_path('examples/reward_in_plain_pytorch.py', run_name='__main__'); "
            "print(sorted(m for m in sys.modules if m.startswith('diffrl.') and m.split('.')[1] "
            "not in ('rewards', 'layout', 'boxes', 'errors', 'registry', 'shapes')))")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    shapes, cycle, other_modules = result.stdout.strip().splitlines()
    start, end = (float(v) for v in re.findall(r"-?\d+\.\d+", shapes))
    assert shapes.startswith("shapes reward") and 0 <= start < end <= 2
    start, end = (float(v) for v in re.findall(r"-?\d+\.\d+", cycle))
    assert cycle.startswith("cycle reward") and -1 <= start < end <= 0
    assert other_modules == "[]"
