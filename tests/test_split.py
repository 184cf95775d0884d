"""`diffrl.eval.split`: sampling with one denoiser inside the RL window and another after it."""

import copy

import pytest
import torch
from torch import nn

from diffrl.eval.evaluate import generate
from diffrl.eval.split import TimeSplit, split_generator, window_boundary
from diffrl.policies.samplers import FlowSampler
from diffrl.shapes.world import sample_layouts


class Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, cond):
        return torch.full_like(x, self.value)


def test_each_row_goes_to_the_denoiser_of_its_time():
    split = TimeSplit(Constant(1.0), Constant(-1.0), boundary=0.85)
    x = torch.zeros(4, 3, 2, 2)
    out = split(x, torch.tensor([1.0, 0.9, 0.8, 0.85]), None)
    assert out[:, 0, 0, 0].tolist() == [1.0, 1.0, -1.0, -1.0]  # strictly above the boundary is early
    assert split(x, torch.full((4,), 0.9), None).eq(1).all()
    assert split(x, torch.full((4,), 0.1), None).eq(-1).all()


def test_window_boundary_lies_between_the_last_window_step_and_the_next():
    # diffusers' 10 flow steps at shift 1 run at 1.0, 0.889, 0.778, ... (linspace(1, 1/1000, 10)); a window of
    # 2 steps runs at 1.0 and 0.889, the third step at 0.778
    assert window_boundary(FlowSampler(), 10, 2, shift=1.0) == pytest.approx((0.889 + 0.778) / 2)
    assert window_boundary(FlowSampler(), 5, 1, shift=1.0) == pytest.approx((1.0 + 0.75025) / 2)
    for bad in (0, 10):
        with pytest.raises(ValueError, match="window_steps"):
            window_boundary(FlowSampler(), 10, bad, shift=1.0)


@pytest.fixture
def changed(tiny_generator):
    """The tiny generator's denoiser with every weight moved a little: a stand-in for trained weights."""
    denoiser = copy.deepcopy(tiny_generator.denoiser)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return denoiser


def test_split_runs_each_denoiser_on_its_own_steps(tiny_generator, changed, one_thread):
    layouts = sample_layouts(3, [2, 3], seed=5)
    boundary = window_boundary(tiny_generator.sampler, 4, 1)
    base = tiny_generator.denoiser

    def sample(generator):
        return generate(generator, layouts, num_steps=4, seed=3, batch_size=3)

    same = sample(split_generator(tiny_generator, base, base, boundary))
    assert torch.equal(same, sample(tiny_generator))  # both halves the model itself: nothing changes
    early_only = sample(split_generator(tiny_generator, changed, base, boundary))
    late_only = sample(split_generator(tiny_generator, base, changed, boundary))
    both = sample(split_generator(tiny_generator, changed, changed, boundary))
    assert not torch.equal(early_only, same) and not torch.equal(late_only, same)
    assert not torch.equal(early_only, both) and not torch.equal(late_only, both)


def test_split_generator_steps_with_the_early_denoiser_above_the_boundary_only(tiny_generator, changed):
    layouts = sample_layouts(2, [2], seed=6)
    split = split_generator(tiny_generator, changed, tiny_generator.denoiser, boundary=0.7)
    trained = split_generator(tiny_generator, changed, changed, boundary=0.7)
    cond = tiny_generator.encode_layouts(layouts)
    x = torch.randn(2, *tiny_generator.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t, t_next, expected in ((1.0, 0.75, trained), (0.75, 0.5, trained), (0.7, 0.5, tiny_generator),
                                    (0.5, 0.25, tiny_generator)):
            got, _ = split.step_mean_std(x, t, t_next, cond, 0.0)
            want, _ = expected.step_mean_std(x, t, t_next, cond, 0.0)
            assert torch.equal(got, want), t
        base, _ = tiny_generator.step_mean_std(x, 1.0, 0.75, cond, 0.0)
        assert not torch.equal(base, split.step_mean_std(x, 1.0, 0.75, cond, 0.0)[0])
