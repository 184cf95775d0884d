"""Rollout workers and reward actors on a local Ray (2 CPUs): a 2-worker run trains on weights synced every
iteration; killing a worker or a reward actor mid-run loses no iteration and changes no number; reward
actors score chunk i while chunk i+1 denoises and mark the samples a reward fails on."""

import json
import logging
import math
import os
import sys
import time
from functools import partial

import pytest
import torch
import yaml

from diffrl.cli import main
from diffrl.config import build_config, parse_override
from diffrl.distributed.ray_workers import RolloutPool, ScaleOut, check_address, chunk_seed, make_chunks
from diffrl.errors import UserError
from diffrl.policies.generator import load_generator
from diffrl.rewards import RewardOutput, ShapesReward
from diffrl.rewards.remote import RemoteReward
from diffrl.shapes.world import sample_layouts


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FlakyReward travels to the actors by value
    yield ray
    ray.shutdown()


def status(layout) -> str:
    """What FlakyReward does with a layout: raise on a triangle first, NaN on a circle first."""
    first = layout.phrases[0]
    return "raise" if first.endswith("triangle") else "nan" if first.endswith("circle") else "ok"


class FlakyReward(ShapesReward):
    def __call__(self, images, layouts):
        if any(status(layout) == "raise" for layout in layouts):
            raise ValueError("detector crashed on this image")
        out = super().__call__(images, layouts)
        nan = torch.tensor([status(layout) == "nan" for layout in layouts])
        return RewardOutput(torch.where(nan, torch.full_like(out.rewards, math.nan), out.rewards), out.info)


class HangOnceReward(ShapesReward):
    """Hangs (far past any timeout) on the first call of the whole run, then scores normally: a stuck worker."""

    def __init__(self, flag: str):
        super().__init__()
        self.flag = flag

    def __call__(self, images, layouts):
        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            time.sleep(600)
        return super().__call__(images, layouts)


def test_chunks_cover_the_layouts_in_order_with_seeds_of_their_own():
    layouts = sample_layouts(7, [2, 3], seed=0)
    chunks = make_chunks(layouts, group_size=3, size=3, seed=5, iteration=2)
    assert [c.first for c in chunks] == [0, 3, 6] and [len(c.layouts) for c in chunks] == [3, 3, 1]
    assert [layout for c in chunks for layout in c.layouts] == layouts
    assert chunks[2].sample_layouts == [layouts[6]] * 3
    assert [c.seed for c in chunks] == [chunk_seed(5, 2, i) for i in range(3)]  # from (seed, iteration, index) alone
    seeds = {chunk_seed(s, it, i) for s in range(3) for it in range(3) for i in range(3)}
    assert len(seeds) == 27 and all(0 <= x < 2**63 for x in seeds)


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_train_on_synced_weights_and_killed_actors_lose_nothing(tmp_path, saved_generator, ray_cluster,
                                                                           monkeypatch):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 3},
        "eval": {"layouts": 5, "batch_size": 5, "grid": 4},
        "algo": {"lr": 1e-3},  # big steps: a worker sampling with stale weights would show in the ratios
        "ray": {"worker_cpus": 0.5, "reward_cpus": 0.5, "chunk_layouts": 1},  # 2 chunks per iteration
    }))
    common = ["train", "--model", str(saved_generator), "--algo", "grpo", "--config", str(config), "--iterations", "3",
              "--workers", "2", "--reward-workers", "1", "--quiet"]
    calm, faulty = tmp_path / "calm", tmp_path / "faulty"
    assert main([*common, "--out", str(calm)]) == 0

    lines = _lines(calm)
    assert [line["iteration"] for line in lines] == [1, 2, 3]
    trainable = sum(p.numel() * p.element_size() for p in load_generator(str(saved_generator)).denoiser.parameters())
    assert all(line["sync_bytes"] == trainable for line in lines)  # policy.train=all: the whole denoiser, once
    for line in lines:
        # the learner re-scores the workers' samples with its own weights: a ratio of 1 means the workers
        # sampled with the weights of the latest update (stale ones give ratios near 0 at this learning rate)
        assert line["mean_ratio"] == pytest.approx(1, abs=1e-3) and line["max_ratio"] < 1.01
        assert line["worker_restarts"] == 0 and line["invalid_samples"] == 0 and "events" not in line
        assert line["reward_seconds"] > 0 and math.isfinite(line["reward_mean"])
    assert lines[-1]["kl_ref"] > 0  # the policy moved away from the reference

    # the same run, with worker 0 killed right after iteration 2's first chunk was handed to it and the reward
    # actor killed right after iteration 3's first batch was (the base evaluation is the reward's first batch)
    counts = {"rollout": 0, "reward": 0}
    submit_rollout, submit_reward = RolloutPool._submit, RemoteReward.submit

    def kill_worker(pool, slot, chunk):
        refs = submit_rollout(pool, slot, chunk)
        counts["rollout"] += 1
        if counts["rollout"] == 3:
            ray_cluster.kill(pool.handles[slot], no_restart=True)
        return refs

    def kill_reward_actor(remote, images, layouts):
        ticket = submit_reward(remote, images, layouts)
        counts["reward"] += 1
        if counts["reward"] == 6:
            ray_cluster.kill(remote._handles[ticket.slot], no_restart=True)
        return ticket

    monkeypatch.setattr(RolloutPool, "_submit", kill_worker)
    monkeypatch.setattr(RemoteReward, "submit", kill_reward_actor)
    assert main([*common, "--out", str(faulty)]) == 0

    got = _lines(faulty)
    assert [line["iteration"] for line in got] == [1, 2, 3]
    assert [line["worker_restarts"] for line in got] == [0, 1, 1]
    assert "rollout worker 0 died" in got[1]["events"][0] and "collected chunk 0 again" in got[1]["events"][0]
    assert "reward actor 0 died" in got[2]["events"][0]
    varies = {"seconds", "rollout_seconds", "reward_seconds", "reward_wait_seconds", "worker_restarts", "events"}
    assert [{k: v for k, v in line.items() if k not in varies} for line in got] == \
           [{k: v for k, v in line.items() if k not in varies} for line in lines]
    assert json.loads((faulty / "summary.json").read_text())["final"] == json.loads((calm / "summary.json").read_text())["final"]


def test_reward_actors_score_chunk_i_while_chunk_i_plus_1_denoises_and_mark_failures(saved_generator, ray_cluster):
    cfg = build_config(overrides=[("model.name", str(saved_generator)), ("algo.name", "ppo"),  # whole rollouts
                                  ("env.layouts_per_iter", 4),
                                  ("env.group_size", 2), ("env.num_steps", 8), ("ray.reward_workers", 1),
                                  ("ray.reward_cpus", 0.5), ("ray.chunk_layouts", 1)])
    layouts = sample_layouts(4, [3, 4], seed=1)
    statuses = [status(layout) for layout in layouts]
    assert sorted(set(statuses)) == ["nan", "ok", "raise"]  # the seed gives every case
    generator = load_generator(str(saved_generator))
    with ScaleOut(cfg, generator, torch.device("cpu"), reward_factory=FlakyReward) as scale:
        assert scale.reward is not None and scale.rollouts.__class__.__name__ == "LocalRollouts"
        scale.collect(0, layouts)  # warm-up: the reward's first call imports its detector
        got = scale.collect(1, layouts)

    assert got.rollout.batch_size == torch.Size([8, 8])
    assert torch.equal(got.rollout["layout_index"], torch.arange(4).repeat_interleave(2)[:, None].expand(8, 8))
    rewards = got.rollout["next", "reward"][:, -1, 0]
    assert torch.equal(rewards.isnan(), got.reward.rewards.isnan())
    assert torch.equal(rewards.nan_to_num(), got.reward.rewards.nan_to_num())
    bad = torch.tensor([s != "ok" for s in statuses]).repeat_interleave(2)
    assert torch.equal(rewards.isnan(), bad)
    assert len(got.errors) == 2 * statuses.count("raise") and got.errors[0] == "ValueError: detector crashed on this image"
    assert (rewards[~bad] > 0).all()
    # DDPO's asynchronous reward: each chunk goes to the reward actor before the next one starts denoising …
    pairs = list(zip(got.timeline, got.timeline[1:]))
    assert all(this["rollout_end"] <= this["reward_submitted"] <= following["rollout_start"] for this, following in pairs)
    # … and is scored while it denoises (asserted for one chunk, not each: this 2-core machine is shared)
    assert any(this["reward_start"] < following["rollout_end"] for this, following in pairs)
    assert got.stats["reward_seconds"] > 0 and got.stats["worker_restarts"] == 0


def test_unreachable_address_and_oversized_requests_are_one_line(tmp_path, saved_generator, ray_cluster, capsys):
    with pytest.raises(UserError, match="no Ray cluster answers there"):
        check_address("127.0.0.1:1")
    with pytest.raises(UserError, match="expected host:port"):
        check_address("my-head-node")
    for args, message in ((["--workers", "3"], "ask for 3 CPUs but the Ray cluster has 2"),
                          (["--workers", "1", "ray.worker_gpus=1"], "ask for 1 GPUs but the Ray cluster has 0")):
        assert main(["train", "--model", str(saved_generator), "--out", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "run").exists()


def test_a_hung_rollout_worker_is_replaced_after_chunk_timeout(tmp_path, saved_generator, ray_cluster):
    cfg = build_config(overrides=[("model.name", str(saved_generator)), ("env.layouts_per_iter", 2),
                                  ("env.group_size", 2), ("env.num_steps", 3), ("ray.workers", 1),
                                  ("ray.worker_cpus", 0.5), ("ray.chunk_layouts", 1), ("ray.chunk_timeout", 8.0)])
    generator = load_generator(str(saved_generator))
    layouts = sample_layouts(2, [2, 3], seed=0)
    flag = tmp_path / "hung-once"
    started = time.monotonic()
    with ScaleOut(cfg, generator, torch.device("cpu"), reward_factory=partial(HangOnceReward, str(flag))) as scale:
        got = scale.collect(0, layouts)
    assert flag.exists() and time.monotonic() - started < 120  # it hung once, and the run went on
    assert got.stats["worker_restarts"] == 1
    assert len(got.events) == 1 and got.events[0].startswith("rollout worker 0 hung (no result for chunk 0 in 8 s); replaced it")
    rewards = got.rollout["next", "reward"][:, -1, 0]
    assert rewards.shape == (4,) and torch.isfinite(rewards).all() and (rewards > 0).all()


class EnvProbe(ShapesReward):
    """Rewards every sample with the number in $DIFFRL_PROBE (-1 where unset): what the actor's environment holds."""

    def __call__(self, images, layouts):
        return RewardOutput(torch.full((images.shape[0],), float(os.environ.get("DIFFRL_PROBE", "-1"))))


def test_reward_runtime_env_reaches_the_reward_actors(saved_generator, ray_cluster):
    cfg = build_config(overrides=[("model.name", str(saved_generator)), ("ray.reward_workers", 1),
                                  ("ray.reward_cpus", 0.5),
                                  parse_override("reward.runtime_env={env_vars: {DIFFRL_PROBE: '0.25'}}")])
    layouts = sample_layouts(2, [2], seed=0)
    with ScaleOut(cfg, load_generator(str(saved_generator)), torch.device("cpu"), reward_factory=EnvProbe) as scale:
        assert scale.reward(torch.zeros(2, 3, 8, 8), layouts).rewards.tolist() == [0.25, 0.25]
    assert "DIFFRL_PROBE" not in os.environ  # the actor's, not the driver's
