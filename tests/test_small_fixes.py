"""Small things a user meets: the bad-JSON column, resuming a finished run, help(ShapesReward), the train bar."""

import json
import pydoc

import yaml

from diffrl.cli import main
from diffrl.layout import LayoutError, read_jsonl
from diffrl.rewards import ShapesReward

import pytest


def test_a_bad_json_line_names_the_column_of_the_error(tmp_path):
    line = '{"prompt": "a red square", "phrases": ["red square"], "boxes": [[0.1, 0.1, 0.5, 0.55]]'  # no closing }
    assert len(line) == 86  # the error is just past the end: column 87
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(LayoutError, match=r"bad.jsonl:1: not valid JSON \(.* at column 87\)"):
        read_jsonl(path)


def test_help_of_shapes_reward_is_its_own_docstring():
    text = pydoc.render_doc(ShapesReward, renderer=pydoc.plaintext)
    assert "Helper class that provides a standard way to create an ABC" not in text
    assert "r = Σ_i [IoU_i + c_i]" in text and "instance_mask" in text


def test_the_bar_names_the_phase_and_a_finished_run_says_so_when_resumed(tmp_path, saved_generator, capsys,
                                                                         one_thread):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 3},
                                      "eval": {"layouts": 4, "batch_size": 4, "grid": 4}}))
    run = tmp_path / "run"
    assert main(["train", "--model", str(saved_generator), "--config", str(config), "--iterations", "1",
                 "--out", str(run)]) == 0
    err = capsys.readouterr().err
    for phase in ("train nft · rollout", "train nft · reward", "train nft · update"):  # the default learner
        assert phase in err
    summary = (run / "summary.json").read_text()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "is finished (1 iterations), nothing to do" in captured.err
    assert f"--resume {run} iterations=11" in captured.err
    assert captured.out.startswith("            ISR")  # its summary again, from summary.json
    assert (run / "summary.json").read_text() == summary  # not redone
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert main(["train", "--resume", str(run), "--quiet", "iterations=2"]) == 0  # extending it trains on
    assert json.loads((run / "summary.json").read_text())["iterations"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(lines) + 1
