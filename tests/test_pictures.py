"""Pictures a person reads: grids with gutters, captions and failed instances marked; a train run's before_after.png
(also after a resume); every evaluation's scalars and the grids in TensorBoard."""

import json

import numpy as np
import pytest
import torch

from diffrl.cli import main
from diffrl.eval.visualize import (BACKGROUND, CELL, MARK, before_after, caption_height, font, sample_grid,
                                   summary_line, wrap)
from diffrl.layout import Layout

GREY = 0.5  # a tile's plain background in these hand-made cases


def layout(prompt="a red square and a blue circle"):
    return Layout(prompt, ("red square", "blue circle"), ((0.2, 0.2, 0.5, 0.5), (0.55, 0.55, 0.9, 0.9)))


def plain(n):
    return torch.full((n, 3, 16, 16), GREY)


def test_the_default_grid_is_as_before_gutters_and_captions_are_asked_for():
    images, layouts = plain(3), [layout()] * 3
    assert sample_grid(images, layouts, columns=2).size == (2 * CELL, 2 * CELL)
    grid = np.asarray(sample_grid(images, layouts, columns=2, gutter=8, captions=True))
    band = caption_height(counted=False)
    assert grid.shape[:2] == (2 * (CELL + band) + 3 * 8, 2 * CELL + 3 * 8)
    first_row = slice(8, 8 + CELL)
    assert (grid[first_row, 8 + CELL: 16 + CELL] == BACKGROUND).all()  # the gutter between the first two tiles
    assert (grid[:8] == BACKGROUND).all() and (grid[:, :8] == BACKGROUND).all()  # and around them
    caption_band = grid[8 + CELL: 8 + CELL + band, 8: 8 + CELL]
    assert (caption_band != BACKGROUND).any(axis=-1).sum() > 50  # the prompt is written under the tile
    assert (grid[8 + CELL + band: 16 + CELL + band] == BACKGROUND).all()  # the gutter under the caption


def test_a_failed_instance_is_marked_and_a_passed_one_is_not():
    def marks(verdicts):
        tile = np.asarray(sample_grid(plain(1), [layout()], columns=1, verdicts=verdicts))
        return (tile == MARK).all(axis=-1)

    passed, failed = marks(torch.tensor([[True, True]])), marks(torch.tensor([[True, False]]))
    assert not passed.any() and not marks(None).any()
    ys, xs = np.nonzero(failed)
    assert len(ys) > 20
    corner = (round(0.9 * (CELL - 1)), round(0.55 * (CELL - 1)))  # the failed box's top-right corner (x, y)
    assert abs(xs.mean() - corner[0]) < 8 and abs(ys.mean() - corner[1]) < 8  # its badge sits there, not on the other


def test_a_long_prompt_is_wrapped_and_shortened_to_fit():
    prompt = ", ".join(["a black triangle"] * 12)
    lines = wrap(prompt, CELL, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font().getlength(line) <= CELL for line in lines)
    assert wrap("a red square", CELL, 3) == ["a red square"]


def test_before_after_puts_pairs_side_by_side_under_a_header():
    ok, bad = torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)
    metrics = {"isr": 0.5, "miou": 0.4, "reward": 1.0, "verdicts": {"ok": 4, "missed": 2, "wrong box": 1,
                                                                     "wrong attribute": 1}}
    header = [summary_line("base", metrics)]
    assert header[0] == "base: ISR 0.500 · mIoU 0.400 · reward 1.000 · ok 4 · missed 2 · wrong box 1 · wrong attribute 1"
    picture = np.asarray(before_after(plain(4), plain(4), [layout()] * 4, bad, ok, header=header, pairs_per_row=2))
    assert picture.shape[1] >= 2 * (2 * CELL) + 3 * 8 and picture.shape[0] > 2 * CELL
    left, right = picture[:, : picture.shape[1] // 4], picture[:, picture.shape[1] // 4: picture.shape[1] // 2]
    assert (left == MARK).all(axis=-1).any() and not (right == MARK).all(axis=-1).any()  # base failed, trained not


def _short_run(saved_generator, out, *extra):
    return main(["train", "--model", str(saved_generator), "--algo", "nft", "--iterations", "1",
                 "env.layouts_per_iter=4", "env.group_size=2", "env.num_steps=3", "eval.layouts=10", "eval.grid=4",
                 "--quiet", "--out", str(out), *extra])


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_a_short_run_leaves_before_after_and_its_evaluations_in_tensorboard(tmp_path, saved_generator, one_thread):
    run = tmp_path / "run"
    assert _short_run(saved_generator, run) == 0
    for name in ("samples_before.png", "samples_after.png", "before_after.png"):
        assert (run / name).stat().st_size > 1000
    events, summary = _events(run), json.loads((run / "summary.json").read_text())
    tags = events.Tags()
    for key in ("eval/isr", "eval/miou", "eval/reward", "eval/L2/isr", "eval/verdicts/ok", "eval/verdicts/wrong_box"):
        assert key in tags["scalars"], tags["scalars"]
    assert [(e.step, e.value) for e in events.Scalars("eval/isr")] == [
        (0, pytest.approx(summary["base"]["isr"])), (1, pytest.approx(summary["final"]["isr"]))]
    assert [e.value for e in events.Scalars("eval/verdicts/ok")] == [summary["base"]["verdicts"]["ok"],
                                                                     summary["final"]["verdicts"]["ok"]]
    assert {"eval/samples_before", "eval/samples_after", "eval/before_after"} <= set(tags["images"])
    assert [e.step for e in events.Images("eval/before_after")] == [1]
    assert "train/reward_mean" in tags["scalars"]


def test_a_resumed_run_still_draws_before_after(tmp_path, saved_generator, one_thread):
    run = tmp_path / "run"
    assert _short_run(saved_generator, run, "checkpoint_every=1", "eval.every=1") == 0
    for name in ("before_after.png", "samples_after.png", "summary.json"):
        (run / name).unlink()  # as if killed after its checkpoint: the base images are in no process's memory now
    assert main(["train", "--resume", str(run), "--iterations", "3", "--quiet"]) == 0
    assert (run / "before_after.png").stat().st_size > 1000 and (run / "samples_after.png").is_file()
    events = _events(run)
    assert [e.step for e in events.Scalars("eval/isr")] == [0, 1, 2, 3]  # base, final of part one, eval.every, final
    assert [e.step for e in events.Images("eval/samples")] == [2]


def test_the_kept_base_samples_are_tile_sized_and_draw_the_same_tiles():
    from diffrl.eval.visualize import tile, tile_sized, to_uint8

    images = to_uint8(torch.rand(2, 3, 3 * CELL, 3 * CELL, generator=torch.Generator().manual_seed(0)))
    kept = tile_sized(images)
    assert kept.shape == (2, 3, CELL, CELL) and tile_sized(kept) is kept
    for full, small in zip(images, kept):
        assert np.array_equal(np.asarray(tile(full.permute(1, 2, 0).numpy(), layout())),
                              np.asarray(tile(small.permute(1, 2, 0).numpy(), layout())))
