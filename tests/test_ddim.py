"""The DDIM step against independent computations: diffusers' DDIMScheduler.step, torch's Normal, hand algebra."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffrl.policies.sde import ddim_mean_std, ddim_step

# SD1.5's scheduler settings (its scheduler_config.json, read into a DDIMScheduler as the SD pipelines do)
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _scheduler(steps=10, **overrides) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SD15, **overrides})
    scheduler.set_timesteps(steps)
    return scheduler


def _alphas(scheduler: DDIMScheduler, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ_t and ᾱ_prev of diffusers' step at this timestep (its prev_timestep rule)."""
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_alpha = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[timestep], prev_alpha


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 4, 4, generator=g), torch.randn(b, 4, 4, 4, generator=g)


def test_eta_zero_is_diffusers_ddim_step_exactly():
    scheduler = _scheduler()
    x, eps = _inputs()
    for timestep in scheduler.timesteps.tolist():  # 901 … 1; the last one steps to final_alpha_cumprod
        expected = scheduler.step(eps, timestep, x, eta=0.0).prev_sample
        got = ddim_step(eps, *_alphas(scheduler, timestep), x, eta=0.0)
        assert torch.equal(got.prev_sample, expected), timestep
        assert torch.equal(got.mean, expected)
        assert torch.all(got.std == 0) and torch.all(got.log_prob == 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_eta_positive_mean_std_and_sample_are_diffusers_with_variance_noise(eta, prediction_type):
    scheduler = _scheduler(prediction_type=prediction_type)
    x, out = _inputs(1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for timestep in scheduler.timesteps.tolist():
        expected = scheduler.step(out, timestep, x, eta=eta, variance_noise=noise).prev_sample
        mean, std = ddim_mean_std(out, *_alphas(scheduler, timestep), x, eta, prediction_type=prediction_type)
        deterministic = scheduler.step(out, timestep, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        assert torch.equal(mean, deterministic)  # diffusers' sample with zero noise is the mean
        assert torch.equal(mean + std * noise, expected)
        # std is η·sqrt(DDPM posterior variance): diffusers' _get_variance
        prev = timestep - 1000 // 10
        expected_std = eta * scheduler._get_variance(timestep, prev) ** 0.5
        assert torch.equal(std.flatten(), expected_std.expand(3))


def test_clip_sample_matches_diffusers():
    scheduler = _scheduler(clip_sample=True, clip_sample_range=1.0)
    x, eps = _inputs(3)
    x = 3 * x  # x0 predictions far outside [−1, 1]
    timestep = int(scheduler.timesteps[-2])
    expected = scheduler.step(eps, timestep, x, eta=0.0).prev_sample
    got = ddim_step(eps, *_alphas(scheduler, timestep), x, eta=0.0, clip_sample=1.0)
    assert torch.equal(got.prev_sample, expected)


def test_mean_and_std_match_hand_computation():
    # ᾱ_t = 0.5, ᾱ_prev = 0.8, η = 1, x = 1, ε = 0.5 (one scalar element):
    # x0 = (1 − sqrt(0.5)·0.5)/sqrt(0.5) = sqrt(2) − 0.5
    # σ² = (0.2/0.5)·(1 − 0.5/0.8) = 0.4·0.375 = 0.15
    # mean = sqrt(0.8)·x0 + sqrt(1 − 0.8 − 0.15)·0.5 = sqrt(0.8)·(sqrt(2) − 0.5) + sqrt(0.05)·0.5
    x = torch.ones(1, 1, 1, 1)
    eps = torch.full((1, 1, 1, 1), 0.5)
    mean, std = ddim_mean_std(eps, 0.5, 0.8, x, 1.0)
    assert std.item() == pytest.approx(math.sqrt(0.15))
    assert mean.item() == pytest.approx(math.sqrt(0.8) * (math.sqrt(2) - 0.5) + math.sqrt(0.05) * 0.5)


def test_log_prob_is_the_exact_gaussian_density_summed_over_dims():
    scheduler = _scheduler()
    x, eps = _inputs(4)
    steps = [int(t) for t in scheduler.timesteps[[0, 4, 9]]]  # one per sample, the last to final_alpha_cumprod
    alpha = torch.stack([_alphas(scheduler, t)[0] for t in steps])  # [B]
    alpha_prev = torch.stack([_alphas(scheduler, t)[1] for t in steps])
    step = ddim_step(eps, alpha, alpha_prev, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert step.log_prob.shape == (3,) and step.std.shape == (3, 1, 1, 1)
    expected = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob, expected.sum(dim=(1, 2, 3)))


def test_rescoring_a_sample_gives_ratio_exactly_one():
    scheduler = _scheduler()
    x, eps = _inputs(6)
    alphas = _alphas(scheduler, int(scheduler.timesteps[3]))
    taken = ddim_step(eps, *alphas, x, eta=0.8, generator=torch.Generator().manual_seed(7))
    rescored = ddim_step(eps, *alphas, x, eta=0.8, prev_sample=taken.prev_sample)
    assert torch.equal(rescored.prev_sample, taken.prev_sample)
    assert torch.equal(torch.exp(rescored.log_prob - taken.log_prob), torch.ones(3))


def test_fp16_inputs_give_fp32_density_and_keep_the_sample_dtype():
    scheduler = _scheduler()
    x, eps = _inputs(8)
    step = ddim_step(eps.half(), *_alphas(scheduler, 501), x.half(), eta=1.0, generator=torch.Generator().manual_seed(1))
    assert step.prev_sample.dtype == torch.float16
    assert step.mean.dtype == step.log_prob.dtype == torch.float32
    assert torch.isfinite(step.log_prob).all()
