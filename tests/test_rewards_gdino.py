"""Grounding DINO through transformers, with a tiny model built from configs in code (no downloads):
phrase attribution against hand-computed logits and against transformers' own post-processing, loading
through save_pretrained → from_pretrained, the offline error, and `diffrl train` with the tiny detector."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from diffrl.cli import main
from diffrl.errors import UserError
from diffrl.rewards import GroundingDinoReward
from diffrl.rewards.grounder import load_grounding_dino, phrase_detections, query_text, token_phrases
from diffrl.shapes.world import render, sample_layouts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny_gdino: tests/conftest.py


def test_query_text_and_token_spans():
    text, spans = query_text(["Red square", "blue circle."])
    assert text == "red square. blue circle." and spans == [(0, 10), (12, 23)]
    # [CLS] red square . blue circle . [SEP] [PAD]
    offsets = torch.tensor([[0, 0], [0, 3], [4, 10], [10, 11], [12, 16], [17, 23], [23, 24], [0, 0], [0, 0]])
    assert token_phrases(offsets, spans).tolist() == [-1, 0, 0, -1, 1, 1, -1, -1, -1]


def test_phrase_detections_by_hand():
    owner = torch.tensor([-1, 0, 0, -1, 1, 1, -1, -1])  # [CLS] red square . blue circle . [SEP]
    probs = torch.full((4, 8), 0.01)
    probs[0, 2] = 0.9  # "square" → red square, confidence 0.9
    probs[1, 4], probs[1, 1] = 0.6, 0.5  # "blue" beats "red" → blue circle, 0.6
    probs[2, 5] = 0.3  # under the box threshold: dropped
    probs[3, 3], probs[3, 1] = 0.8, 0.2  # kept box (the dot scores 0.8), but no phrase token over 0.25: dropped
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.4, 0.2], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    found = phrase_detections(torch.logit(probs), boxes, owner, ["red square", "blue circle"], 0.35, 0.25)
    torch.testing.assert_close(found["red square"].boxes, torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    torch.testing.assert_close(found["red square"].scores, torch.tensor([0.9]))
    torch.testing.assert_close(found["blue circle"].boxes, torch.tensor([[0.0, 0.1, 0.3, 0.3]]))  # x0 −0.1 → 0
    torch.testing.assert_close(found["blue circle"].scores, torch.tensor([0.6]))


def test_kept_boxes_are_those_of_transformers_post_processing(tiny_gdino):
    """Same box scores, threshold and box conversion as GroundingDinoProcessor.post_process_grounded_object_detection;
    each of its text labels is the phrase the query went to."""
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

    processor, _ = load_grounding_dino(str(tiny_gdino))
    text, spans = query_text(["red square", "blue circle"])
    tokens = processor.tokenizer([text], return_offsets_mapping=True, return_tensors="pt")
    owner = token_phrases(tokens["offset_mapping"][0], spans)
    generator = torch.Generator().manual_seed(0)
    logits = torch.full((1, 20, 32), -float("inf"))
    logits[0, :, :8] = -4.0  # σ = 0.018 on every token of the text
    phrase = torch.randint(2, (20,), generator=generator)  # each query raises one phrase's tokens to a random level
    level = torch.rand(20, 1, generator=generator) * 7 - 4
    logits[0, :, :8] = torch.where(owner[None] == phrase[:, None], level, logits[0, :, :8])
    boxes = torch.rand(1, 20, 4, generator=generator) * 0.5 + 0.25
    reference = processor.post_process_grounded_object_detection(
        GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes), tokens["input_ids"], 0.35, 0.25)[0]
    ours = phrase_detections(logits[0], boxes[0], torch.nn.functional.pad(owner, (0, 24), value=-1),
                             ["red square", "blue circle"], 0.35, 0.25)
    assert 0 < len(reference["boxes"]) < 20
    for name, found in ours.items():
        expected = [i for i, label in enumerate(reference["text_labels"]) if label == name]
        assert expected
        torch.testing.assert_close(found.boxes, reference["boxes"][expected].clamp(0, 1))
        torch.testing.assert_close(found.scores, reference["scores"][expected])


def test_tiny_grounding_dino_reward_from_a_saved_folder(tiny_gdino):
    layouts = sample_layouts(3, [2, 3], seed=0)
    images = render(layouts)
    reward = GroundingDinoReward(model=str(tiny_gdino), box_threshold=0.0, text_threshold=0.0)
    out = reward(images, layouts)
    assert out.rewards.shape == (3,) and ((0 <= out.rewards) & (out.rewards <= 2)).all()
    mask = out.info["instance_mask"]
    assert mask.shape == (3, 3) and mask.sum().item() == sum(l.n for l in layouts)
    assert out.info["found"][mask].any() and not out.info["found"][~mask].any()
    per_instance = (out.info["iou"] + out.info["confidence"]) * mask
    torch.testing.assert_close(out.rewards, per_instance.sum(1) / mask.sum(1))
    torch.testing.assert_close(reward(images, layouts).rewards, out.rewards)  # eval mode: deterministic
    strict = GroundingDinoReward(model=str(tiny_gdino), box_threshold=1.0)  # nothing passes: every instance missed
    assert strict(images, layouts).rewards.tolist() == [0.0, 0.0, 0.0]


def test_a_folder_without_weights_is_one_line_naming_what_to_download(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        GroundingDinoReward(model=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message and "tokenizer.json" in message
    assert "hf download IDEA-Research/grounding-dino-tiny" in message and "--reward-model DIR" in message


def test_cli_without_weights_offline_fails_before_any_work(tmp_path):
    # The generator does not exist either: failing on the detector proves the reward is checked first.
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "diffrl.cli", "train", "--env", "layout", "--reward", "gdino", "--algo", "ppo",
         "--model", str(tmp_path / "no-generator"), "--out", str(run)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "hf download IDEA-Research/grounding-dino-tiny" in lines[0] and "--reward-model" in lines[0]
    assert not run.exists()


def test_cli_trains_one_iteration_with_the_tiny_detector(tmp_path, tiny_gdino, saved_generator):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 4},
                                      "eval": {"layouts": 10, "batch_size": 5, "grid": 4}}))
    run = tmp_path / "run"
    assert main(["train", "--model", str(saved_generator), "--env", "layout", "--reward", "gdino=1,cycle=0.5",
                 "--reward-model", str(tiny_gdino), "--algo", "ppo", "--iterations", "1", "--config", str(config),
                 "--out", str(run), "--quiet"]) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())["reward"]
    assert (resolved["name"], resolved["model"], resolved["options"]) == ("gdino=1,cycle=0.5", str(tiny_gdino), {})
    (entry,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= entry["reward/gdino"] <= 2 and -1 <= entry["reward/cycle"] <= 0
    assert entry["reward_mean"] == pytest.approx(entry["reward/gdino"] + 0.5 * entry["reward/cycle"], abs=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["final"]["isr"] <= 1 and summary["iterations"] == 1
