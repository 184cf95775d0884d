"""--resume continues a run from its last checkpoint and reproduces the uninterrupted run's metrics."""

import json

import yaml

from diffrl.cli import main

TIMING = {"seconds", "rollout_seconds"}


def _metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_matches_the_uninterrupted_run(tmp_path, saved_generator):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 4},
                                      "eval": {"layouts": 4, "batch_size": 4, "grid": 4}, "checkpoint_every": 1}))
    common = ["--model", str(saved_generator), "--algo", "ppo", "--config", str(config), "--quiet"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", *common, "--iterations", "3", "--out", str(whole)]) == 0
    assert main(["train", *common, "--iterations", "2", "--out", str(part)]) == 0
    # as if killed after writing iteration 3's metrics line but before its checkpoint, mid-way through line 4
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "reward_mean": -1.0}) + '\n{"iteration": 4, "rew')
    assert main(["train", "--resume", str(part), "--iterations", "3", "--quiet"]) == 0
    assert _metrics(part) == _metrics(whole)
    assert [m["iteration"] for m in _metrics(part)] == [1, 2, 3]
    assert json.loads((part / "summary.json").read_text())["final"] == json.loads((whole / "summary.json").read_text())["final"]
