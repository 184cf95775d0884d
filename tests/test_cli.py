"""The command line: user errors are one line and exit 2; a short run leaves every artefact."""

import json
import subprocess
import sys

import pytest
import yaml

from diffrl.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffrl.cli", *args], capture_output=True, text=True, timeout=300)


def test_unknown_registry_name_is_one_line_listing_the_valid_ones():
    result = run_cli("train", "--reward", "nope")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown reward 'nope'" in lines[0] and "shapes" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_layout_file_names_the_line_and_exits_2(tmp_path, capsys):
    data = tmp_path / "layouts.jsonl"
    good = {"prompt": "a red square", "phrases": ["red square"], "boxes": [[0.1, 0.1, 0.4, 0.4]]}
    bad = {"prompt": "a red square", "phrases": ["red square"], "boxes": [[0.5, 0.1, 0.2, 0.4]]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layouts.jsonl:2:" in err[0] and "boxes[0]" in err[0] and "x1" in err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "algo.nope=1"], "unknown config key 'algo.nope'"),
        (["train", "algo.lr=fast"], "config algo.lr: expected a number"),
        (["train", "--model", "/no/such/model"], "not a registered model"),
        (["train", "--data", "missing.jsonl"], "no such file"),
        (["train", "--config", "missing.yaml"], "no such file"),
        (["eval", "--levels", "9"], "levels must be among"),
        (["train", "--algo", "grpo", "group.scale=layout"], "config group.scale: 'group' or 'batch'"),
        (["train", "policy.window_start=0.9"], "runs past the last of 10 steps"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("key, allowed", [
    ("model.dtype", "one of float32, bfloat16, float16"),
    ("policy.train", "'all' or 'adapter'"),
    ("pg.log_prob_reduce", "'sum' or 'mean'"),
    ("group.scale", "'group' or 'batch'"),
    ("forward.sampler", "'ode' or 'sde'"),
    ("forward.time_sampling", "'schedule' or 'uniform'"),
    ("reward.http_format", "'png' or 'safetensors'"),
])
def test_a_value_outside_a_fields_choices_is_one_line_naming_the_key_and_the_choices(key, allowed):
    from diffrl.config import build_config
    from diffrl.errors import UserError

    with pytest.raises(UserError) as err:
        build_config({}, [(key, "nope")])
    assert str(err.value) == f"config {key}: {allowed}, got 'nope'"

MOVED_KEYS = [("algo.clip_epsilon", "pg.clip_epsilon", 0.1), ("algo.log_prob_reduce", "pg.log_prob_reduce", "mean"),
              ("algo.anchor_steps", "pg.anchor_steps", 2), ("algo.critic_lr", "ppo.critic_lr", 1e-2),
              ("algo.critic_coef", "ppo.critic_coef", 0.5), ("algo.normalize_advantage", "ppo.normalize_advantage", False),
              ("algo.group_scale", "group.scale", "batch"), ("algo.ldm_coef", "joint.ldm_coef", 1.0),
              ("algo.dis_coef", "joint.dis_coef", 0.1)]


def test_the_moved_table_names_each_old_key_once_and_only_keys_that_exist():
    from diffrl.config import MOVED, field_help

    keys = {key for key, _, _ in field_help()}
    assert {(old, new) for old, new, _ in MOVED_KEYS} == set(MOVED.items())
    assert not keys & set(MOVED) and set(MOVED.values()) <= keys


@pytest.mark.parametrize("how", ["override", "yaml"])
@pytest.mark.parametrize("old, new, value", MOVED_KEYS)
def test_a_moved_key_is_one_line_naming_its_new_key_and_nothing_is_written(old, new, value, how, tmp_path, capsys):
    out = tmp_path / "run"
    if how == "override":
        args = ["train", "--algo", "ppo", f"{old}={json.dumps(value)}", "--out", str(out)]
    else:
        section, key = old.split(".")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({section: {"lr": 1e-4, key: value}}))
        args = ["train", "--algo", "ppo", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config {old} is now {new}" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("pg.clip_epsilon=0", "config pg.clip_epsilon: must be > 0, got 0.0"),
    ("pg.anchor_steps=-1", "config pg.anchor_steps: must be ≥ 0 (0: none), got -1"),
    ("pg.log_prob_reduce=max", "config pg.log_prob_reduce: 'sum' or 'mean', got 'max'"),
    ("ppo.critic_lr=-1", "config ppo.critic_lr and ppo.critic_coef must be ≥ 0, got -1.0, 1.0"),
    ("ppo.critic_coef=-0.5", "config ppo.critic_lr and ppo.critic_coef must be ≥ 0, got 0.001, -0.5"),
    ("ppo.normalize_advantage=maybe", "config ppo.normalize_advantage: expected true or false, got 'maybe'"),
    ("group.scale=layout", "config group.scale: 'group' or 'batch', got 'layout'"),
    ("joint.ldm_coef=-1", "config joint.ldm_coef: must be ≥ 0, got -1.0"),
    ("joint.dis_coef=-1", "config joint.dis_coef: must be ≥ 0, got -1.0"),
])
def test_each_learner_section_checks_its_values_in_one_line(override, message, tmp_path, capsys):
    assert main(["train", "--algo", "ppo", override, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_config_saved_before_the_split_reads_into_the_new_sections():
    """A run folder's config.yaml from before the learner sections (resume, export, eval --checkpoint) still loads;
    a config saved now passes through unchanged."""
    from diffrl.config import build_config, to_dict, upgrade_saved

    saved = to_dict(build_config({}, [("algo.name", "ppo")]))
    old = {**saved, "algo": {**saved["algo"], **{o.split(".")[1]: v for o, _, v in MOVED_KEYS}}}
    for section in ("pg", "ppo", "group", "joint"):
        del old[section]
    cfg = build_config(upgrade_saved(old))
    assert [cfg.pg.clip_epsilon, cfg.pg.log_prob_reduce, cfg.pg.anchor_steps, cfg.ppo.critic_lr, cfg.ppo.critic_coef,
            cfg.ppo.normalize_advantage, cfg.group.scale, cfg.joint.ldm_coef, cfg.joint.dis_coef] == \
        [v for _, _, v in MOVED_KEYS]
    assert upgrade_saved(saved) == saved


def test_help_lists_valid_names_and_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for expected in ("learner (awm, grpo, nft, ppo, sft)", "reward (cycle, gdino, http, shapes)", "environment (layout)",
                     "algo.kl_coef", "policy.window", "forward.nft_beta"):
        assert expected in out


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for line in ("env (--env): layout", "reward (--reward): cycle, gdino, http, shapes",
                 "algo (--algo): awm, grpo, nft, ppo, sft", "model (--model): shapes-mislabeled, shapes-tiny",
                 "data (--data): shapes, shapes-loose"):
        assert line in out


def test_a_short_run_leaves_config_metrics_events_checkpoints_grids_and_summary(tmp_path, saved_generator, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 4},
                                      "eval": {"layouts": 10, "batch_size": 5, "grid": 4}}))
    run = tmp_path / "run"
    code = main(["train", "--model", str(saved_generator), "--algo", "grpo", "--iterations", "2", "--out", str(run),
                 "--config", str(config), "--quiet", "checkpoint_every=1", "algo.kl_coef=0.05"])
    assert code == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["algo"]["name"] == "grpo" and resolved["algo"]["kl_coef"] == 0.05 and resolved["env"]["num_steps"] == 4
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss_objective", "kl_ref", "clip_fraction", "seconds"):
        assert all(key in l for l in lines)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-000001.safetensors",
                                                                       "checkpoint-000002.safetensors"]
    for name in ("samples_before.png", "samples_after.png"):
        assert (run / name).stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["eval_layouts"] == 10 and summary["wall_seconds"] > 0
    for block in (summary["base"], summary["final"]):
        assert 0 <= block["isr"] <= 1 and 0 <= block["miou"] <= 1
        assert set(block["per_level"]) == {"L2", "L3", "L4", "L5", "L6"}
        instances = sum(level["instances"] for level in block["per_level"].values())
        assert sum(block["verdicts"].values()) == instances and block["verdicts"]["ok"] == round(block["isr"] * instances)
    base_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("base"))
    assert base_row.endswith(" / ".join(str(n) for n in summary["base"]["verdicts"].values()))
    # the same folder is not overwritten by accident
    assert main(["train", "--model", str(saved_generator), "--out", str(run)]) == 2


def test_pretrain_writes_a_generator_folder_that_eval_and_train_accept(tmp_path, capsys):
    out = tmp_path / "pretrained"
    assert main(["pretrain", "--out", str(out), "--steps", "3", "--batch-size", "4", "--eval-every", "0"]) == 0
    log = json.loads((out / "pretrain.json").read_text())
    assert log["config"]["steps"] == 3 and (out / "layout_adapter" / "model.safetensors").is_file()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--layouts", "10", "--levels", "2", "3", "--steps", "2",
                 "--out", str(report), "--quiet"]) == 0
    metrics = json.loads(report.read_text())
    assert set(metrics["per_level"]) == {"L2", "L3"} and sum(v["instances"] for v in metrics["per_level"].values()) == 25
    assert 0 <= metrics["isr"] <= 1 and 0 <= metrics["reward"] <= 2
    assert sum(metrics["verdicts"].values()) == 25
    printed = capsys.readouterr().out
    assert "L2" in printed and ", ".join(f"{k}: {v}" for k, v in metrics["verdicts"].items()) in printed
    assert main(["pretrain", "--out", str(tmp_path / "again"), "--steps", "1", "--init", str(tmp_path / "nothing")]) == 2
