"""Faults a long run meets, in one process (no Ray): a reward that fails or returns NaN for some samples,
GPU out-of-memory, bad scale-out flags. Each is marked, counted and reported, or one line naming the fix."""

import json
import math

import pytest
import torch
import yaml

import diffrl.algos.trainer as trainer
from diffrl.cli import main
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.rewards import RewardOutput, ShapesReward
from diffrl.rewards.guard import GuardedReward, cat_outputs
from diffrl.shapes.world import render, sample_layouts


def status(layout) -> str:
    """What the flaky reward does with a layout of ≥ 3 instances: raise on a triangle first, NaN on a circle first."""
    if layout.n < 3:
        return "ok"
    first = layout.phrases[0]
    return "raise" if first.endswith("triangle") else "nan" if first.endswith("circle") else "ok"


class FlakyReward(ShapesReward):
    """The Shapes reward, except that it raises for a whole batch holding a 'raise' layout and returns NaN
    for each 'nan' layout. Evaluation (2-instance layouts below) is never affected."""

    def __call__(self, images, layouts):
        if any(status(layout) == "raise" for layout in layouts):
            raise ValueError("detector crashed on this image")
        out = super().__call__(images, layouts)
        nan = torch.tensor([status(layout) == "nan" for layout in layouts], device=out.rewards.device)
        return RewardOutput(torch.where(nan, torch.full_like(out.rewards, math.nan), out.rewards), out.info)


def test_guard_passes_a_working_reward_through_untouched():
    layouts = sample_layouts(4, [2, 3], seed=0)
    images = render(layouts, size=32)
    inner = ShapesReward()
    out = GuardedReward(inner)(images, layouts)
    expected = inner(images, layouts)
    assert torch.equal(out.rewards, expected.rewards)
    assert out.info.keys() == expected.info.keys() and all(torch.equal(out.info[k], expected.info[k]) for k in out.info)


def test_guard_marks_exactly_the_samples_the_reward_raises_on_and_keeps_the_others():
    layouts = [layout for layout in sample_layouts(40, [3, 4], seed=3)][:12]
    statuses = [status(layout) for layout in layouts]
    assert "raise" in statuses and "ok" in statuses  # the seed gives both
    images = render(layouts, size=32)
    guard = GuardedReward(FlakyReward())
    out = guard(images, layouts)
    clean = ShapesReward()(images, layouts)
    for i, s in enumerate(statuses):
        if s == "ok":
            assert out.rewards[i] == clean.rewards[i]
            assert torch.equal(out.info["iou"][i, : layouts[i].n], clean.info["iou"][i, : layouts[i].n])
        else:
            assert math.isnan(out.rewards[i])
    raised = [i for i, s in enumerate(statuses) if s == "raise"]
    assert not out.info["instance_mask"][raised].any()  # a sample that raised reports no instances
    errors = guard.take_errors()
    assert len(errors) == len(raised) and all(e == "ValueError: detector crashed on this image" for e in errors)
    assert guard.take_errors() == []


def test_guard_never_swallows_gpu_out_of_memory():
    class Oom(ShapesReward):
        def __call__(self, images, layouts):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    layouts = sample_layouts(2, [2], seed=0)
    with pytest.raises(torch.OutOfMemoryError):
        GuardedReward(Oom())(render(layouts, size=32), layouts)


def test_cat_outputs_pads_instances_and_fills_missing_keys():
    a = RewardOutput(torch.tensor([1.0]), {"iou": torch.tensor([[0.5, 0.25]]), "instance_mask": torch.tensor([[True, True]])})
    b = RewardOutput(torch.tensor([2.0, 3.0]), {"iou": torch.tensor([[0.75], [1.0]]),
                                                "instance_mask": torch.tensor([[True], [True]])})
    failed = RewardOutput(torch.tensor([math.nan]))
    out = cat_outputs([a, failed, b])
    assert torch.equal(out.rewards[[0, 2, 3]], torch.tensor([1.0, 2.0, 3.0])) and math.isnan(out.rewards[1])
    assert torch.equal(out.info["iou"], torch.tensor([[0.5, 0.25], [0, 0], [0.75, 0], [1.0, 0]]))
    assert torch.equal(out.info["instance_mask"], torch.tensor([[True, True], [False, False], [True, False], [True, False]]))


def small_config(tmp_path, **extra):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "env": {"layouts_per_iter": 3, "group_size": 2, "num_steps": 3, "levels": [3, 4]},
        "eval": {"layouts": 4, "batch_size": 4, "grid": 4, "levels": [2]}, **extra}))
    return str(config)


def test_a_flaky_reward_marks_counts_and_excludes_samples_and_the_run_goes_on(tmp_path, saved_generator, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "build_reward", lambda *args: FlakyReward())
    run = tmp_path / "run"
    assert main(["train", "--model", str(saved_generator), "--algo", "grpo", "--iterations", "4", "--out", str(run),
                 "--config", small_config(tmp_path)]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4]
    # replay the run's data order: the env draws layouts_per_iter layouts per iteration from ShapesLayouts(seed)
    source = ShapesLayouts([3, 4], seed=0)
    expected = [[status(layout) for layout in source.sample(3)] for _ in lines]
    for line, statuses in zip(lines, expected):
        assert line["invalid_samples"] == 2 * sum(s != "ok" for s in statuses)  # group_size 2
        assert line["reward_errors"] == 2 * statuses.count("raise")
        if line["invalid_samples"]:
            assert any("left out of the update" in event for event in line["events"])
        if line["invalid_samples"] < 6:
            assert math.isfinite(line["reward_mean"])  # NaN never reaches the logged mean
            assert math.isfinite(line["loss_objective"]) and math.isfinite(line["grad_norm"])
        else:  # nothing left to learn from: no update, and said so
            assert "reward_mean" not in line and "loss_objective" not in line
            assert "this iteration's update was skipped" in line["events"][-1]
    flat = [s for statuses in expected for s in statuses]
    assert "raise" in flat and "nan" in flat and "ok" in flat  # the seed exercised every case
    assert any(0 < line["invalid_samples"] < 6 for line in lines)  # … with partial batches too
    assert "left out of the update" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["final"]["reward"] > 0


def test_a_reward_that_raises_on_every_sample_stops_the_run(tmp_path, saved_generator, monkeypatch):
    class Broken(ShapesReward):
        def __call__(self, images, layouts):
            if min(layout.n for layout in layouts) >= 3:  # training layouts only
                raise KeyError("no such detector head")
            return super().__call__(images, layouts)

    monkeypatch.setattr(trainer, "build_reward", lambda *args: Broken())
    with pytest.raises(RuntimeError, match="raised on every sample of iteration 1: KeyError"):
        main(["train", "--model", str(saved_generator), "--iterations", "2", "--out", str(tmp_path / "run"),
              "--config", small_config(tmp_path), "--quiet"])


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("where, knob", [("eval", "eval.batch_size (now 4)"), ("rollout", "env.layouts_per_iter (now 3)")])
def test_gpu_out_of_memory_is_one_line_naming_the_knob(tmp_path, saved_generator, monkeypatch, capsys, where, knob):
    if where == "eval":
        monkeypatch.setattr(trainer, "evaluate", _raise_oom)
    else:  # only the training env (group_size 2) runs out; the evaluation's env (group 1) works
        rollout = LayoutEnv.rollout
        monkeypatch.setattr(LayoutEnv, "rollout", lambda env, *a, **k: _raise_oom() if env.group_size == 2 else rollout(env, *a, **k))
    assert main(["train", "--model", str(saved_generator), "--iterations", "1", "--out", str(tmp_path / "run"),
                 "--config", small_config(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GPU out of memory" in err[0] and knob in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--workers", "-1"], "--workers: must be ≥ 0, got -1"),
    (["--reward-workers", "-2"], "--reward-workers: must be ≥ 0, got -2"),
    (["ray.worker_cpus=0"], "ray.worker_cpus and ray.reward_cpus must be > 0"),
    (["--address", "10.0.0.1:6379"], "nothing would run on the cluster"),
])
def test_bad_scale_out_flags_are_one_line_and_start_nothing(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_in_the_rollout_names_env_layouts_per_iter(tmp_path, saved_generator, capsys):
    """A ~200 MiB cap on this process's CUDA memory: the model and the evaluation fit, a 2048-sample rollout does not."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(200 * 2**20 / total, 0)
    try:
        code = main(["train", "--model", str(saved_generator), "--device", "cuda", "--iterations", "1", "--quiet",
                     "--out", str(tmp_path / "run"), "--config", small_config(tmp_path), "env.layouts_per_iter=512",
                     "env.group_size=4", "env.num_steps=10"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GPU out of memory while generating rollouts" in err[0], err
    assert "env.layouts_per_iter (now 512)" in err[0]
