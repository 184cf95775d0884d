"""`diffrl sweep`: the sweep file's errors are one line (exit 2); rows × grid × seeds expand as written; mean ± std
checked by hand; a tiny 2-trial sweep runs through the real Ray Tune path, writes results.md/csv/png, and a second
run of the same command runs only the trial that did not finish, from its own checkpoint."""

import csv
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import yaml

from diffrl.cli import main
from diffrl.errors import UserError
from diffrl.sweep import parse_sweep
from diffrl.sweep.report import aggregate, markdown, mean_std, write_csv
from diffrl.sweep.runner import require_extra

TINY = {"iterations": 1, "env": {"layouts_per_iter": 2, "group_size": 2, "levels": [2, 3], "num_steps": 3},
        "eval": {"layouts": 4, "levels": [2, 3], "grid": 4}, "algo": {"name": "grpo"}}


def write(tmp_path, data, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("data, message", [
    ({"rows": {"a": {}}, "sedes": [0]}, "unknown top-level key 'sedes'; did you mean seeds?"),
    ({"rows": {"PPO": {"algo.nope": 1}}}, "rows PPO: unknown config key 'algo.nope'"),
    ({"rows": {"PPO": {"algo.lr": "fast"}}}, "rows PPO: config algo.lr: expected a number"),
    ({"rows": {"PPO": {"seed": 3}}}, "rows PPO: 'seed' is the sweep's to set"),
    ({"base": {"out": "x"}}, "base: 'out' is the sweep's to set"),
    ({"seeds": [0, 0]}, "seeds: expected a list of distinct integers"),
    ({"rows": {"a": {"model.name": "idm"}}}, "rows a: model.name 'idm': not a registered model"),
    ({"models": {"idm": {"pretrain": {"stepz": 3}}}}, "unknown key of models idm: pretrain 'stepz'; did you mean steps?"),
    ({"models": {"m": {"pretrain": {"steps": 2}}}, "rows": {"a": {"model.name": "m", "algo.name": "ppo", "joint.dis_coef": 0.1}}},
     "joint.dis_coef needs a generator with IDM"),
    ({"rows": {"IDM+PPO": {"algo.dis_coef": 0.1}}}, "rows IDM+PPO: config algo.dis_coef is now joint.dis_coef"),
    ({"base": {"algo": {"clip_epsilon": 0.1}}}, "config algo.clip_epsilon is now pg.clip_epsilon"),
    ({"grid": {"algo.group_scale": ["group", "batch"]}}, "config algo.group_scale is now group.scale"),
    ({"metrics": ["isr_L9"]}, "unknown metric 'isr_L9'"),
    ({"leakage_layouts": 0, "metrics": ["leakage"]}, "metrics: leakage needs leakage_layouts > 0"),
    ({"grid": {"algo.lr": []}}, "grid algo.lr: expected a non-empty list"),
    ("rows: [unclosed", "not valid YAML"),
])
def test_sweep_file_errors_are_one_line_naming_the_file_with_exit_2(tmp_path, capsys, data, message):
    path = write(tmp_path, data)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing started


def test_missing_file_and_missing_extra_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["sweep", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray.tune", None)  # as if ray[tune] were not installed
    with pytest.raises(UserError, match=r"pip install 'diffrl\[sweep\]'"):
        require_extra()


def test_rows_times_grid_times_seeds_with_a_row_of_its_own_seeds():
    sweep = parse_sweep({"base": {"iterations": 3}, "seeds": [0, 1],
                         "rows": {"PPO": {"algo.name": "ppo"}, "eval only": {"iterations": 0, "seeds": [7]}},
                         "grid": {"algo.lr": [1e-5, 1e-4]}})
    ids = [t.id for t in sweep.trials]
    assert ids == ["ppo-algo-lr-1e-05-seed0", "ppo-algo-lr-1e-05-seed1", "ppo-algo-lr-0-0001-seed0",
                   "ppo-algo-lr-0-0001-seed1", "eval-only-algo-lr-1e-05-seed7", "eval-only-algo-lr-0-0001-seed7"]
    assert list(sweep.rows) == ["PPO algo.lr=1e-05", "PPO algo.lr=0.0001", "eval only algo.lr=1e-05",
                                "eval only algo.lr=0.0001"]
    first, last = sweep.trials[0].config, sweep.trials[-1].config
    assert (first["algo"]["lr"], first["seed"], first["iterations"]) == (1e-5, 0, 3)
    assert (last["algo"]["lr"], last["seed"], last["iterations"]) == (1e-4, 7, 0)
    assert sweep.metrics == ["isr", "miou", "reward", "leakage", "neighbour_pixels"]  # the default columns


def test_mean_and_sample_std_over_seeds_by_hand(tmp_path):
    # ISR 0.5, 0.7, 0.9: mean 0.7; deviations −0.2, 0, 0.2 → Σ² = 0.08, / (3 − 1) = 0.04, std 0.2
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)
    assert mean_std([0.25]) == (0.25, None)  # one seed: no std
    results = [{"row": "A", "seed": s, "trial": f"a-seed{s}", "isr": v, "miou": 0.1 * (s + 1)}
               for s, v in enumerate([0.5, 0.7, 0.9])] + [{"row": "B", "seed": 0, "trial": "b-seed0", "isr": 0.25}]
    table = aggregate(results, ["A", "B", "C"], ["isr", "miou"])
    assert list(table) == ["A", "B"] and table["A"]["n"] == 3
    assert table["A"]["miou"] == (pytest.approx(0.2), pytest.approx(0.1))  # 0.1, 0.2, 0.3: mean 0.2, std 0.1
    assert "miou" not in table["B"]  # B has no mIoU: left out, not a zero
    text = markdown(table, ["isr", "miou"], "t", {"A": [0, 1, 2], "B": [0, 1], "C": [0]})
    assert "| A | 3/3 | 0.700 ± 0.200 | 0.200 ± 0.100 |" in text
    assert "| B | 1/2 | 0.250 | — |" in text and "| C | 0/1 | — | — |" in text
    rows = list(csv.DictReader(write_csv(tmp_path / "r.csv", results, table, ["isr", "miou"]).open()))
    assert [(r["row"], r["seed"]) for r in rows[4:]] == [("A", "mean"), ("A", "std"), ("B", "mean"), ("B", "std")]
    assert float(rows[5]["isr"]) == pytest.approx(0.2) and rows[7]["isr"] == ""


@pytest.fixture
def local_ray():
    import ray

    started = not ray.is_initialized()  # the Ray tests' cluster may still be up in this session: share it
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


def test_tiny_sweep_on_ray_tune_writes_the_results_and_resumes_only_what_did_not_finish(tmp_path, capsys, local_ray):
    sweep = {"name": "tiny", "base": TINY, "seeds": [0], "leakage_layouts": 4,
             "models": {"idm": {"pretrain": {"idm": True, "init": "shapes-tiny", "steps": 1, "batch_size": 2,
                                             "eval_every": 0}}},
             "rows": {"GRPO": {}, "IDM+GRPO": {"model.name": "idm", "joint.dis_coef": 0.1}},
             "metrics": ["isr_L2", "isr_L3", "miou", "leakage"]}
    path, out = write(tmp_path, sweep), tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[2/2]" in printed and "| IDM+GRPO | 1/1 |" in printed
    for name in ("results.md", "results.csv", "results.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trials = {t: out / "trials" / t for t in ("grpo-seed0", "idm-grpo-seed0")}
    results = {t: json.loads((run / "result.json").read_text()) for t, run in trials.items()}
    assert all(r["iterations"] == 1 and 0 <= r["leakage"] <= 1 and 0 <= r["isr_L3"] <= 1 for r in results.values())
    idm_config = yaml.safe_load((trials["idm-grpo-seed0"] / "config.yaml").read_text())
    assert idm_config["model"]["name"] == str(out / "models" / "idm") and idm_config["joint"]["dis_coef"] == 0.1
    rows = {(r["row"], r["seed"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["GRPO", "0"]["miou"]) == pytest.approx(results["grpo-seed0"]["miou"], rel=1e-5)
    assert float(rows["GRPO", "mean"]["leakage"]) == pytest.approx(results["grpo-seed0"]["leakage"], abs=1e-6)

    # Interrupted after training, before its final evaluation: only that trial runs again, from its checkpoint.
    stamps = {p: p.stat().st_mtime_ns for p in [*trials["grpo-seed0"].rglob("*"), out / "models" / "idm" / "pretrain.json"]
              if p.is_file()}
    checkpoint = next((trials["idm-grpo-seed0"] / "checkpoints").glob("*.safetensors"))
    checkpoint_stamp = checkpoint.stat().st_mtime_ns
    for name in ("summary.json", "result.json"):
        (trials["idm-grpo-seed0"] / name).unlink()
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 trials finished before; running the other 1" in printed and "[2/2] IDM+GRPO seed 0" in printed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished trial and the model: untouched
    assert checkpoint.stat().st_mtime_ns == checkpoint_stamp  # no training iteration redone ...
    assert len((trials["idm-grpo-seed0"] / "metrics.jsonl").read_text().splitlines()) == 1  # ... nor logged twice
    again = json.loads((trials["idm-grpo-seed0"] / "result.json").read_text())
    assert again["reward"] == pytest.approx(results["idm-grpo-seed0"]["reward"], abs=1e-6)  # same weights, same eval
    assert len(list((out / "tune").iterdir())) == 2  # two Tune experiments, the second with one trial
    assert not math.isnan(again["isr"])


def test_a_reward_with_per_image_scores_only_reports_dashes_for_isr_and_miou(tmp_path):
    import torch

    from diffrl.sweep.runner import run_trial, write_results

    block = {"isr": None, "miou": None, "reward": 2.5, "per_level": {"L2": {"reward": 2.5, "layouts": 4}},
             "verdicts": None, "note": "per-image scores only"}  # what `summarize_rewards` gives
    run = tmp_path / "trials" / "a-seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"base": block, "final": block, "iterations": 1, "wall_seconds": 3.0}))
    spec = {"trial": "a-seed0", "row": "A", "seed": 0, "config": TINY, "run": str(run), "leakage_layouts": 0,
            "threads": torch.get_num_threads(), "cwd": str(Path.cwd())}
    result = run_trial(spec)  # trained already (its summary.json): only the result is assembled
    assert result["isr"] is None and result["isr_L2"] is None and result["reward"] == 2.5
    sweep = parse_sweep({"base": TINY, "seeds": [0], "rows": {"A": {}}, "metrics": ["isr", "miou", "reward"]})
    write_results(sweep, [result], tmp_path)
    assert "| A | 1/1 | — | — | 2.500 |" in (tmp_path / "results.md").read_text()
    from diffrl.sweep.runner import trial_line

    assert "ISR –  mIoU –  reward 2.500" in trial_line({**result, "seconds": 3.0}, 1, 1)
