"""LayoutEnv passes TorchRL's spec check; the actor's log-probs are exact and on-policy ratios are 1."""

import torch
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type

from diffrl.algos.grpo import GRPO
from diffrl.algos.replica import frozen_copy
from diffrl.config import AlgoConfig
from diffrl.envs.datasets import ShapesLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.policies.actor import LOG_PROB_KEY, SDEPolicyNet, make_actor
from diffrl.policies.sde import flow_sde_step
from diffrl.policies.text import ConditionStore
from diffrl.rewards import ShapesReward


def make(generator, layouts=2, group=3, steps=5, window=2, seed=0, share_noise=False, window_start=0):
    store = ConditionStore()
    env = LayoutEnv(generator, ShapesReward(), ShapesLayouts([2, 3], seed=seed), store,
                    layouts_per_reset=layouts, group_size=group, num_steps=steps, seed=seed, share_noise=share_noise)
    policy = SDEPolicyNet(generator, store, noise_level=0.7, window_steps=window, window_start=window_start)
    return env, policy, make_actor(policy, env.action_spec), store


def test_env_passes_check_env_specs(tiny_generator):
    env, *_ = make(tiny_generator)
    check_env_specs(env)


def test_shared_noise_starts_a_group_from_one_latent_and_exploration_then_splits_it(tiny_generator):
    env, policy, actor, _ = make(tiny_generator, share_noise=True)
    check_env_specs(env)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    start = rollout["latent"][:, 0]  # [6, C, H, W] x_1 of layouts 0, 0, 0, 1, 1, 1
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2]) and torch.equal(start[3], start[5])
    assert not torch.equal(start[0], start[3])
    after = rollout["action"][:, 0]  # the window's first draw differs within a group
    assert not torch.equal(after[0], after[1])
    unshared, *_ = make(tiny_generator)
    latent = unshared.reset()["latent"]  # by default every sample of a group draws its own x_1
    assert not torch.equal(latent[0], latent[1])


def test_rollout_shapes_terminal_reward_and_no_text_in_tensordict(tiny_generator):
    env, policy, actor, store = make(tiny_generator)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    assert rollout.shape == (6, 5)
    reward = rollout["next", "reward"][..., 0]
    assert torch.all(reward[:, :-1] == 0) and torch.all(reward[:, -1] > 0)
    assert rollout["next", "done"][:, -1].all() and not rollout["next", "done"][:, :-1].any()
    # only an index points at the conditioning; groups share their layout
    assert torch.equal(rollout["layout_index"][:, 0], torch.tensor([0, 0, 0, 1, 1, 1]))
    big = [k for k, v in rollout.items(True, True) if v.ndim >= 3 and v.shape[-1] == 64]
    assert big == [], f"text embeddings leaked into the tensordict: {big}"
    assert len(store.layouts) == 2
    # steps after the RL window are deterministic (log-prob 0), window steps are stochastic
    assert torch.all(rollout[LOG_PROB_KEY][:, 2:] == 0) and torch.all(rollout[LOG_PROB_KEY][:, :2] != 0)


def test_actor_log_prob_is_the_sde_step_log_prob_and_ratio_is_one(tiny_generator):
    env, policy, actor, store = make(tiny_generator)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
        step0 = rollout[:, 0]
        cond = store[step0["layout_index"]]
        v = tiny_generator.velocity(step0["latent"], step0["sigma"], cond)
        rescored = flow_sde_step(v, step0["sigma"], step0["sigma_next"], step0["latent"], 0.7, prev_sample=step0["action"])
        torch.testing.assert_close(rescored.log_prob, step0[LOG_PROB_KEY], rtol=1e-5, atol=1e-3)
        dist = actor.get_dist(step0.clone())
        assert torch.equal(dist.log_prob(step0["action"]), step0[LOG_PROB_KEY])  # ratio exactly 1


def test_deterministic_exploration_is_the_ode_sampler(tiny_generator):
    env, policy, actor, store = make(tiny_generator, window=0)
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        a = env.rollout(5, actor, auto_reset=True)
    env.set_seed(0)
    env.source = ShapesLayouts([2, 3], seed=0)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        b = env.rollout(5, actor, auto_reset=True)
    assert torch.equal(a["next", "latent"], b["next", "latent"])


def test_a_later_window_explores_and_trains_only_its_own_steps(tiny_generator):
    env, policy, actor, store = make(tiny_generator, window=2, window_start=2)
    reference = SDEPolicyNet(frozen_copy(tiny_generator), store, 0.7, 2, 2)
    learner = GRPO(policy, reference, actor, AlgoConfig(lr=0.0, minibatch_size=1000, kl_coef=0.1))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    log_prob = rollout[LOG_PROB_KEY]  # [6, 5]: stochastic at steps 2 and 3 only
    assert torch.all(log_prob[:, [0, 1, 4]] == 0) and torch.all(log_prob[:, 2:4] != 0)
    batch = learner.window_batch(rollout)
    assert batch.shape == (6, 2) and torch.equal(batch["step"], torch.tensor([[2, 3]] * 6))
    logs = learner.update(rollout)  # the window's own transitions, re-scored unchanged: ratio 1, no KL
    assert logs["max_ratio"] == 1.0 and logs["kl_ref"] == 0.0


def test_unchanged_policy_rescored_by_the_learner_has_ratio_exactly_one_and_zero_kl(tiny_generator):
    env, policy, actor, store = make(tiny_generator)
    reference = SDEPolicyNet(frozen_copy(tiny_generator), store, 0.7, 2)
    learner = GRPO(policy, reference, actor, AlgoConfig(lr=0.0, minibatch_size=1000, kl_coef=0.1))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    logs = learner.update(rollout)
    assert logs["max_ratio"] == 1.0 and logs["mean_ratio"] == 1.0 and logs["clip_fraction"] == 0.0
    assert logs["kl_ref"] == 0.0


def test_an_update_moves_the_policy_away_from_the_reference(tiny_generator):
    import copy

    generator = copy.deepcopy(tiny_generator)
    env, policy, actor, store = make(generator)
    reference = SDEPolicyNet(frozen_copy(generator), store, 0.7, 2)
    learner = GRPO(policy, reference, actor, AlgoConfig(lr=1e-3, minibatch_size=1000, kl_coef=0.1))
    before = [p.clone() for p in generator.denoiser.parameters()]
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    learner.update(rollout)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, generator.denoiser.parameters()))
    assert changed > 0
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    assert learner.update(rollout)["kl_ref"] > 0


def test_the_kl_term_survives_torchrls_hook_without_params(tiny_generator, monkeypatch):
    """TorchRL's main branch calls ``_get_cur_log_prob(tensordict)`` without ``params``: the override passes any
    arguments through, so the same update gives the same KL as with 0.14's signature."""
    import copy

    from torchrl.objectives import ClipPPOLoss

    def update(patch: bool) -> float:
        generator = copy.deepcopy(tiny_generator)
        env, policy, actor, store = make(generator)
        reference = SDEPolicyNet(frozen_copy(tiny_generator), store, 0.7, 2)
        learner = GRPO(policy, reference, actor, AlgoConfig(lr=1e-3, minibatch_size=1000, kl_coef=0.1))
        torch.manual_seed(0)
        with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
            rollout = env.rollout(5, actor, auto_reset=True)
        learner.update(rollout)
        if patch:  # the next release's signature: no params
            original = ClipPPOLoss._get_cur_log_prob
            monkeypatch.setattr(ClipPPOLoss, "_get_cur_log_prob", lambda self, td: original(self, td))
        torch.manual_seed(1)
        with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
            rollout = env.rollout(5, actor, auto_reset=True)
        return learner.update(rollout)["kl_ref"]

    assert update(False) == update(True) > 0
