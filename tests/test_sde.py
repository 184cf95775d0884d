"""The SDE step against independent computations: diffusers' Euler step, torch's Normal, hand algebra."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffrl.policies.actor import LatentGaussian
from diffrl.policies.sde import flow_sde_step, gaussian_log_prob, kl_to_reference, sde_mean_std


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 3, 4, 4, generator=g)


def test_noise_level_zero_is_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    x, v = _inputs()
    for i, timestep in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, timestep, x, return_dict=False)[0]
        got = flow_sde_step(v, scheduler.sigmas[i], scheduler.sigmas[i + 1], x, noise_level=0.0)
        torch.testing.assert_close(got.prev_sample, expected, rtol=0, atol=1e-6)
        assert torch.all(got.std == 0)
        assert torch.all(got.log_prob == 0)


def test_mean_and_std_match_hand_computation():
    # one scalar case worked by hand: t = 0.5, t_next = 0.25, a = 0.5, x = 1, v = 2
    # σ_t = 0.5·sqrt(0.5/0.5) = 0.5 ; dt = −0.25
    # mean = 1 + [2 + 0.25/(2·0.5)·(1 + 0.5·2)]·(−0.25) = 1 + [2 + 0.25·2]·(−0.25) = 1 − 0.625 = 0.375
    # std  = 0.5·sqrt(0.25) = 0.25
    x = torch.ones(1, 1, 1, 1)
    v = torch.full((1, 1, 1, 1), 2.0)
    mean, std = sde_mean_std(v, 0.5, 0.25, x, 0.5)
    assert mean.item() == pytest.approx(0.375)
    assert std.item() == pytest.approx(0.25)


def test_first_step_at_t_equal_one_uses_next_time_under_the_root():
    # at t = 1: σ_t = a·sqrt(1 / (1 − t_next)) (Flow-GRPO's sigma_max = sigmas[1]); a = 0.7, t_next = 0.9
    x, v = _inputs()
    mean, std = sde_mean_std(v, 1.0, 0.9, x, 0.7)
    sigma_t = 0.7 * math.sqrt(1 / 0.1)
    assert std.flatten()[0].item() == pytest.approx(sigma_t * math.sqrt(0.1))
    expected_mean = x + (v + sigma_t**2 / 2 * x) * (-0.1)
    torch.testing.assert_close(mean, expected_mean)
    assert torch.isfinite(mean).all()


def test_log_prob_is_the_exact_gaussian_density_summed_over_dims():
    x, v = _inputs(1)
    sigma = torch.tensor([0.9, 0.5, 0.3])
    sigma_next = torch.tensor([0.8, 0.4, 0.1])
    step = flow_sde_step(v, sigma, sigma_next, x, noise_level=0.7, generator=torch.Generator().manual_seed(5))
    expected = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob, expected.sum(dim=(1, 2, 3)))
    assert step.log_prob.shape == (3,)


def test_sample_has_the_stated_mean_and_std():
    x = torch.zeros(20000, 1, 1, 1)
    v = torch.ones(20000, 1, 1, 1)
    step = flow_sde_step(v, 0.6, 0.5, x, noise_level=0.8, generator=torch.Generator().manual_seed(0))
    assert step.prev_sample.mean().item() == pytest.approx(step.mean[0].item(), abs=0.01)
    assert step.prev_sample.std().item() == pytest.approx(step.std[0].item(), rel=0.03)


def test_rescoring_the_stored_sample_gives_ratio_exactly_one():
    x, v = _inputs(2)
    first = flow_sde_step(v, 0.7, 0.6, x, noise_level=0.7)
    again = flow_sde_step(v, 0.7, 0.6, x, noise_level=0.7, prev_sample=first.prev_sample)
    assert torch.equal(again.prev_sample, first.prev_sample)
    assert torch.equal(torch.exp(again.log_prob - first.log_prob), torch.ones(3))


def test_kl_is_zero_against_an_identical_reference_and_matches_closed_form():
    x, v = _inputs(3)
    mean, std = sde_mean_std(v, 0.7, 0.6, x, 0.7)
    assert torch.equal(kl_to_reference(mean, mean.clone(), std), torch.zeros(3))
    shifted = mean + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(shifted, std.expand_as(mean))
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl_to_reference(mean, shifted, std), expected)


def test_latent_gaussian_matches_the_step_log_prob_and_handles_point_masses():
    x, v = _inputs(4)
    step = flow_sde_step(v, 0.7, 0.6, x, noise_level=0.7)
    dist = LatentGaussian(step.mean, step.std)
    torch.testing.assert_close(dist.log_prob(step.prev_sample), step.log_prob)
    mean_dist = LatentGaussian(step.mean, step.std, reduce="mean")
    torch.testing.assert_close(mean_dist.log_prob(step.prev_sample), step.log_prob / (3 * 4 * 4))
    point = LatentGaussian(step.mean, torch.zeros_like(step.std))
    assert torch.equal(point.sample(), step.mean)
    assert torch.equal(point.log_prob(step.mean), torch.zeros(3))
    assert torch.equal(gaussian_log_prob(step.mean, step.mean, torch.zeros_like(step.std)), torch.zeros(3))
