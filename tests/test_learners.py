"""``--learners N``: the update on N Ray Train processes equals one process's on the same samples.

2 = 1: two gloo processes, each running its pieces of every optimizer step's minibatches with the gradients summed
before the clip, leave the parameters exactly where one process with the same config does, and log the same values —
at the learners' own settings (default lr): NFT on the Shapes default, and PPO (with its critic) with LoRA on a tiny
SD3 folder and uneven minibatches. It is exact because nothing float depends on the split: every forward has the
same rows in one process and in N (``algo.micro_batch``, the same pieces dealt out), and the step's gradient is summed
in float64, which is exact for float32 terms, so the order of the sum does not matter. (Before, a learner ran the
forward on its n/N rows where one process ran n: the log-probabilities differed in their last bits, the gradients by
~3e-3 relative through 1/σ², and Adam's first step, ±lr on every coordinate, flipped the sign of near-zero ones:
1.6e-5 apart at lr 1e-5.) The exact resume of a 2-learner run, SIGKILLed, is in test_sigkill_resume.py."""

import logging
import math

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.replica import build_learner, learner_replica
from diffrl.config import build_config, micro_batch
from diffrl.distributed.learners import GradSum, Logs, Shard, Whole, combine_logs
from diffrl.distributed.ray_workers import trainable_weights
from diffrl.envs.layout_env import LayoutEnv
from diffrl.errors import UserError
from diffrl.rewards import ShapesReward
from diffrl.shapes.world import sample_layouts
from tests.test_sd3 import build_tiny_sd3


def test_logs_of_pieces_combine_into_the_one_process_values():
    ratios = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.5])  # one minibatch of 5 rows, in pieces of 2 + 3 (on two ranks)
    target, value = torch.tensor([1.0, 2.0, 0.5, 3.0, 2.5]), torch.tensor([0.8, 2.5, 0.0, 3.0, 2.0])

    def records(index, rows, share):
        w, t, e = ratios[rows], target[rows], target[rows] - value[rows]
        ess = float(w.sum() ** 2 / (w**2).sum()) / len(w)
        ev = [float(t.mean()), float(t.var(correction=0)), float(e.mean()), float(e.var(correction=0))]
        return [(0, index, "loss_objective", float(w.mean()), share), (0, index, "mean_ratio", float(w.mean()), share),
                (0, index, "max_ratio", float(w.max()), share), (0, index, "ESS", ess, share),
                (0, index, "stat_ev", ev, share), (0, index, "explained_variance", 0.0, share),
                (0, Logs.STEP, "grad_norm", 7.0, None)]

    got = combine_logs([records(1, slice(2, 5), 3 / 5), records(0, slice(0, 2), 2 / 5)])  # any rank order
    e = target - value
    assert got["loss_objective"] == pytest.approx(float(ratios.mean()))
    assert got["max_ratio"] == 4.0 and got["grad_norm"] == 7.0 and "stat_ev" not in got
    assert got["ESS"] == pytest.approx(float(ratios.sum() ** 2 / (ratios**2).sum()) / 5)
    assert got["explained_variance"] == pytest.approx(1 - float(e.var(correction=0) / target.var(correction=0)))


def test_pieces_and_their_float64_sum_do_not_depend_on_the_learner_count():
    """The pieces of a step are the same whatever N (dealt round robin), and the gradient summed over them in float64
    is the same in any order and split, to the bit, where float32 accumulation is not."""
    chunks = [(0, 0, 0), (1, 0, 4)]  # minibatches of rows 0–3 and 4–5 (minibatch_size 4, 6 rows)
    one = Whole().pieces(chunks, 6, 4, 2)
    assert [(p.rows, p.share) for p in one] == [(slice(0, 2), 0.5), (slice(2, 4), 0.5), (slice(4, 6), 1.0)]
    two = [Shard(r, 2).pieces(chunks, 6, 4, 2) for r in (0, 1)]
    assert sorted(two[0] + two[1]) == sorted(one) and [p.index for p in two[1]] == [1]
    torch.manual_seed(0)
    terms = [torch.randn(10_000) * 10.0 ** torch.randint(-3, 3, (10_000,)) for _ in range(4)]
    param = torch.nn.Parameter(torch.zeros(10_000))

    def sums(order):  # a learner's pieces, backpropagated one after another → its (float64) sum
        grads = GradSum([param])
        for i in order:
            grads.backward((param * terms[i]).sum())
        return grads.take()[0]

    one = sums([0, 1, 2, 3]).float()
    assert torch.equal(one, sums([3, 1, 0, 2]).float())
    assert torch.equal(one, (sums([0, 2]).double() + sums([1, 3]).double()).float())  # two learners, all-reduced
    assert not torch.equal(((terms[0] + terms[1]) + terms[2]) + terms[3], (terms[0] + terms[2]) + (terms[1] + terms[3]))


def test_a_collective_that_lost_its_peer_counts_as_a_dead_learner():
    from diffrl.distributed.learners import _peer_lost

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:23764: Connection reset by peer. This is typically caused by a remote worker hanging")
    assert _peer_lost(gloo) and not _peer_lost(ValueError("a bug")) and not _peer_lost(torch.OutOfMemoryError("oom"))


@pytest.mark.parametrize("override, message", [
    ({"ray": {"learners": 1, "learner_strategy": "fsdp"}}, "add --learners N"),
    ({"ray": {"learners": 2, "learner_strategy": "fsdp"}, "algo": {"name": "sft"}}, "--algo sft is not supported"),
    ({"ray": {"learners": 2, "learner_strategy": "fsdp"}, "algo": {"name": "ppo"}, "joint": {"ldm_coef": 1.0}},
     "L_ldm is backpropagated by one learner"),
])
def test_what_fsdp_does_not_cover_is_one_line(override, message):
    with pytest.raises(UserError, match=message):
        build_config(override)


def test_a_dcp_checkpoint_folder_loads_like_the_file_in_one_process(tmp_path, one_thread):
    """The folder N learners write (here written by one process) holds the file's tensors and loads the same way."""
    import torch.distributed.checkpoint as dcp

    from diffrl.algos.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from diffrl.distributed.dcp import flat_state

    cfg = build_config({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 2}, "algo": {"name": "ppo"}})
    learner, generator, _ = learner_replica(cfg, torch.device("cpu"), {})
    for p in learner.critic.parameters():  # an optimizer state to keep
        p.grad = torch.randn_like(p)
    learner.optimizer.step()
    rng = {"torch": torch.get_rng_state()}
    file = save_checkpoint(tmp_path / "a", 3, learner.trainable_modules(), learner.optimizer, rng)
    tensors, meta = flat_state(learner.trainable_modules(), learner.optimizer, rng, 3)
    folder = tmp_path / "b" / "checkpoint-000003"
    dcp.save(tensors, checkpoint_id=str(folder), no_dist=True)
    (folder / "meta.json").write_text(__import__("json").dumps(meta))
    assert latest_checkpoint(tmp_path / "b") == folder
    got = []
    for path in (file, folder):
        fresh, _, _ = learner_replica(cfg, torch.device("cpu"), {})
        iteration, state = load_checkpoint(path, fresh.trainable_modules(), fresh.optimizer)
        got.append((iteration, state, flat_state(fresh.trainable_modules(), fresh.optimizer, {}, 0)[0]))
    (i1, s1, t1), (i2, s2, t2) = got
    assert i1 == i2 == 3 and torch.equal(s1["torch"], s2["torch"]) and t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) for k in t1) and any(k.startswith("optimizer.") for k in t1)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


class Layouts:
    def sample(self, n):
        return sample_layouts(n, [2, 3], seed=1)


def one_and_two(cfg, then=None):
    """One iteration's rollout, updated by one process and by a 2-learner group from the same state and RNG
    → (one's parameters, the group's driver parameters, one's logs, the group's logs); ``then(group)`` runs before
    the group stops."""
    from diffrl.distributed.learners import LearnerGroup

    device = torch.device("cpu")
    learner, generator, store = learner_replica(cfg, device, {})
    initial = {name: value.clone() for name, value in trainable_weights(generator).items()}
    env = LayoutEnv(generator, ShapesReward(), Layouts(), store, layouts_per_reset=cfg.env.layouts_per_iter,
                    group_size=cfg.env.group_size, num_steps=cfg.env.num_steps, device=device)
    _, actor = build_learner(cfg, generator, store, env)  # the trainer's rollout actor (an ODE one for NFT)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(cfg.env.num_steps, actor, auto_reset=True)
    torch.manual_seed(5)
    logs_one = learner.update(rollout.clone())
    rng_one = torch.get_rng_state()

    driver, driver_generator, driver_store = learner_replica(cfg, device, initial)
    driver_store.set(store.layouts, store.conditioning)
    with LearnerGroup(cfg, driver, driver_generator, driver_store, learner_replica) as group:
        torch.manual_seed(5)
        logs_two = group.update(rollout.clone())
        if then is not None:
            then(group)
    assert torch.equal(torch.get_rng_state(), rng_one)  # the driver's RNG stream is one process's
    trained = {k: p.detach() for k, p in generator.denoiser.named_parameters() if p.requires_grad}
    grouped = {k: p.detach() for k, p in driver_generator.denoiser.named_parameters() if p.requires_grad}
    return trained, grouped, initial, logs_one, logs_two


def check(trained, grouped, initial, logs_one, logs_two):
    assert trained.keys() == grouped.keys() == initial.keys()
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 1e-6  # the update moved weights
    assert max(float((trained[k] - grouped[k]).abs().max()) for k in trained) <= 1e-5  # measured: 0
    assert logs_two["allreduce_bytes"] >= sum(t.numel() * t.element_size() for t in initial.values())
    for key, value in logs_one.items():
        assert math.isclose(logs_two[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, value, logs_two[key])


SHAPES = {"env": {"layouts_per_iter": 3, "group_size": 2, "num_steps": 3}, "ray": {"learners": 2}}


def test_two_learners_equal_one_on_the_shapes_default(ray_local, tmp_path, one_thread):
    """NFT (the default learner, lr 1e-4): one optimizer step per minibatch of 6 rows, in pieces of 3."""
    cfg = build_config({**SHAPES, "out": str(tmp_path)})
    assert cfg.algo.name == "nft" and cfg.algo.lr == 1e-4 and micro_batch(cfg) == 3
    check(*one_and_two(cfg))


def test_two_learners_equal_one_with_lora_on_sd3_and_uneven_minibatches(ray_local, tmp_path, one_thread):
    """PPO (a critic too) with LoRA on a tiny SD3 folder: 6 rows in minibatches of 4 and 2, pieces of 2 — the
    shards are uneven, and the critic's logs (explained_variance from per-piece moments) combine exactly."""
    folder = tmp_path / "sd3"
    build_tiny_sd3(folder)
    cfg = build_config({"model": {"name": str(folder)}, "env": {"layouts_per_iter": 2, "group_size": 3, "num_steps": 2},
                        "algo": {"name": "ppo", "minibatch_size": 4}, "ray": {"learners": 2},
                        "out": str(tmp_path / "run")})
    assert micro_batch(cfg) == 2
    trained, grouped, initial, logs_one, logs_two = one_and_two(cfg)
    assert any("lora_" in k for k in trained)  # LoRA (and the adapter) train; the backbone never travels
    assert "explained_variance" in logs_one
    check(trained, grouped, initial, logs_one, logs_two)


@pytest.mark.parametrize("algo", ["ppo", "nft"])
def test_fsdp_learners_equal_one_process_and_write_one_checkpoint(ray_local, tmp_path, one_thread, algo):
    """ray.learner_strategy=fsdp, full fine-tuning (policy.train=all) of the Shapes denoiser: FSDP2 shards every MM-DiT
    block and adapter fuser over the 2 learners; PPO's critic stays whole (its gradient all-reduced, the clip over
    both), NFT's θ_old is a sharded copy. Not bit for bit (a few parameters' gradients differ in their last bits, see
    experiments/fsdp2_gloo.py): PPO (lr 1e-5) ends 1.5e-8 from one process, within the 1e-5 of ddp's check; NFT at
    its lr 1e-4 ends 1.3e-5 apart on 284 of 3.1 M coordinates — Adam's first step moves every coordinate by ±lr, so
    one whose gradient is ~0 goes either way — and the rest within 1e-7, its logs within 1e-6. Each learner holds
    half the weights, and the checkpoint the two write together (each its shards) reads back as the weights the
    group sent to the driver."""
    from diffrl.algos.checkpoint import read_checkpoint

    cfg = build_config({"env": {"layouts_per_iter": 3, "group_size": 2, "num_steps": 3}, "algo": {"name": algo},
                        "model": {"name": "shapes-tiny"}, "policy": {"train": "all"},
                        "ray": {"learners": 2, "learner_strategy": "fsdp"}, "out": str(tmp_path)})
    saved = {}
    trained, grouped, initial, logs_one, logs_two = one_and_two(
        cfg, then=lambda group: saved.update(path=group.save_checkpoint(tmp_path / "ckpt", 1, {"torch": torch.get_rng_state()})))
    if algo == "ppo":
        check(trained, grouped, initial, logs_one, logs_two)
    else:
        apart = torch.cat([(trained[k] - grouped[k]).abs().reshape(-1) for k in trained])
        moved = torch.cat([(trained[k] - initial[k]).abs().reshape(-1) for k in trained])
        assert float(moved.max()) > 1e-5 and int((apart > 1e-7).sum()) < 1e-3 * apart.numel()
        assert float(apart.max()) <= 2 * cfg.algo.lr
        for key, value in logs_one.items():
            assert math.isclose(logs_two[key], value, rel_tol=1e-5, abs_tol=1e-9), (key, value, logs_two[key])
    whole = sum(t.numel() * t.element_size() for t in initial.values())
    assert 0.45 * whole < logs_two["learner_param_bytes"] < 0.55 * whole  # ddp: all of it on every learner
    tensors, meta = read_checkpoint(saved["path"])
    assert int(meta["iteration"]) == 1 and any(k.startswith("optimizer.") for k in tensors)
    for name, value in grouped.items():
        assert torch.equal(tensors[f"denoiser.{name}"], value), name
    if algo == "nft":  # θ_old, sharded, comes back whole: after one iteration η = 0.001, so it is 0.999·θ_0 + 0.001·θ_1
        eta = min(cfg.forward.old_uprate, cfg.forward.old_uphold)
        old = {k[len("nft_old."):]: v for k, v in tensors.items() if k.startswith("nft_old.p")}
        assert len(old) == len(initial)
        for i, name in enumerate(initial):
            want = initial[name] * eta + grouped[name] * (1 - eta)
            assert torch.allclose(old[f"p{i}"], want, atol=1e-6), name


def test_learners_feed_the_rollout_workers(tmp_path):
    """--learners 2 with --workers 1: rank 0's weights reach the driver and from there the rollout worker (trainable
    tensors only, `sync_bytes`), so with the same algo.micro_batch the run is the one-learner run line for line — a
    stale worker would roll out iteration 2 on old weights and part ways there."""
    import json
    import os
    import subprocess
    import sys

    args = ["train", "--model", "shapes-tiny", "--algo", "ppo", "--workers", "1", "--iterations", "3", "--quiet",
            "env.layouts_per_iter=2", "env.group_size=2", "env.num_steps=3", "eval.layouts=5", "algo.micro_batch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"learners{n}"
        result = subprocess.run([sys.executable, "-m", "diffrl.cli", *args, "--learners", str(n), "--out", str(runs[n])],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    moved = {"allreduce_bytes", "learner_param_bytes", "learner_sync_bytes"}
    lines = {n: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for n, run in runs.items()}
    assert all(line["sync_bytes"] > 0 and line["allreduce_bytes"] > 0 for line in lines[2])
    assert [{k: v for k, v in line.items() if "seconds" not in k and k not in moved} for line in lines[2]] == \
           [{k: v for k, v in line.items() if "seconds" not in k} for line in lines[1]]
