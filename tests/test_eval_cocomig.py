"""COCO-MIG's judge and the layout readers: OpenCV's HSV by hand, the colour check on rendered Shapes images,
NMS and noun extraction by hand, the judge's ISR / mIoU through a stub grounder, SAM from configs, readers on
small inline files, and `diffrl eval --judge cocomig` end to end with a tiny Grounding DINO and a tiny SAM."""

import base64
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from diffrl.boxes import nms
from diffrl.cli import main
from diffrl.errors import UserError
from diffrl.eval.cocomig import (HSV_RANGES, HSV_TABLE, HSV_TABLES, CocoMigJudge, SamSegmenter, Verdicts, box_masks,
                                 cocomig_grounder, cocomig_metrics, color_fraction, hsv_opencv, in_color, parse_layouts,
                                 resize_like_eval_mig, split_phrase, to_uint8)
from diffrl.eval.readers import read_layouts
from diffrl.layout import Layout, LayoutError, write_jsonl
from diffrl.rewards.grounder import Grounder, Grounding, phrase_detections
from diffrl.shapes.world import COLORS, render

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- colour check


def test_hsv_is_opencvs_8bit_conversion_by_hand():
    # OpenCV's RGB2HSV_b: V = max, S = round(255·diff/V), H = round(30·h'/diff) with h' = G−B (V = R),
    # B−R+2·diff (V = G) or R−G+4·diff (V = B), +180 when negative; rounding through 12-bit fixed point.
    rgb = torch.tensor([
        [230, 26, 26],  # Shapes red: diff 204, S = 204·255/230 = 226.2 → 226, h' = 0 → H 0
        [242, 217, 26],  # Shapes yellow: diff 216, h' = 191, H = 191·30/216 = 26.5 → 27, S = 216·255/242 = 227.6 → 228
        [26, 178, 38],  # Shapes green: diff 152, h' = 12 + 304 = 316, H = 62.4 → 62, S = 152·255/178 = 217.8 → 218
        [26, 64, 230],  # Shapes blue: diff 204, h' = −38 + 816 = 778, H = 114.4 → 114, S 226
        [247, 247, 247],  # Shapes white: diff 0 → H 0, S 0
        [13, 13, 13],  # Shapes black
        [128, 128, 128],  # Shapes background: V 128 is neither white (≥ 221) nor black (≤ 35)
        [150, 75, 0],  # brown: h' = 75, H = 75·30/150 = 15, S 255
        [200, 0, 50],  # crimson: h' = −50, H = −7.5 → fixed point −7 → 173 (red's upper range)
        [0, 0, 0],
    ])
    expected = [[0, 226, 230], [27, 228, 242], [62, 218, 178], [114, 226, 230], [0, 0, 247], [0, 0, 13],
                [0, 0, 128], [15, 255, 150], [173, 255, 200], [0, 0, 0]]
    assert hsv_opencv(rgb).tolist() == expected


def test_every_palette_colour_passes_its_own_check_and_fails_every_other():
    """A square of each Shapes colour, judged over its box: 100% of its pixels are in its own HSV range and
    none in any other (the hand-computed HSV values above sit inside exactly one range each)."""
    assert set(COLORS) <= set(HSV_RANGES)  # the table covers the whole palette (and brown besides)
    box = (0.25, 0.25, 0.75, 0.75)
    for color in COLORS:
        image = render([Layout(f"a {color} square", [f"{color} square"], [box])])[0]
        hsv = hsv_opencv(to_uint8(image))
        region = box_masks(torch.tensor([box]), 32, 32)[0]
        assert int(region.sum()) == 16 * 16
        for asked in HSV_RANGES:
            assert color_fraction(hsv, region, asked) == (1.0 if asked == color else 0.0), (color, asked)


def test_brown_and_partly_filled_regions():
    brown = torch.tensor([150, 75, 0]).view(1, 1, 3).expand(4, 4, 3)  # H 15: brown [6, 25], not red [0, 6] nor yellow
    everything = torch.ones(4, 4, dtype=torch.bool)
    assert [c for c in HSV_RANGES if color_fraction(hsv_opencv(brown), everything, c) == 1.0] == ["brown"]
    # A circle fills π/4 of its box and a triangle half of it: both pass the 20% bar over the box.
    box = (0.0, 0.0, 1.0, 1.0)
    region = box_masks(torch.tensor([box]), 32, 32)[0]
    circle, triangle = render([Layout("c", ["red circle"], [box]), Layout("t", ["red triangle"], [box])])
    assert color_fraction(hsv_opencv(to_uint8(circle)), region, "red") == pytest.approx(0.785, abs=0.02)
    assert color_fraction(hsv_opencv(to_uint8(triangle)), region, "red") == pytest.approx(0.5, abs=0.03)
    assert color_fraction(hsv_opencv(to_uint8(circle)), torch.zeros(32, 32, dtype=torch.bool), "red") == 0.0


def test_the_two_hsv_tables_by_hand():
    """Pixels on which eval_mig.py's current table (7f5da08) and its first one (723d10e) disagree, their HSV by
    hand as above and their colours from the tables' bounds (7f5da08 | 723d10e)."""
    cases = [  # RGB, HSV, colours in 7f5da08, colours in 723d10e
        ((200, 53, 0), (8, 255, 200), {"red", "brown"}, {"brown"}),  # H 53·30/200 = 7.95 → 8: red is H ≤ 9 | ≤ 6
        ((33, 33, 33), (0, 0, 33), set(), {"black"}),  # black is V ≤ 30 | ≤ 35
        ((0, 255, 170), (80, 255, 255), {"green"}, {"blue"}),  # H (170 + 510)·30/255 = 80: green 36–89 | blue 78–124
        ((200, 165, 165), (0, 45, 200), set(), {"red"}),  # S 35·255/200 = 44.6 → 45: colours need S ≥ 50 | ≥ 43
        ((255, 187, 0), (22, 255, 255), {"brown"}, {"yellow", "brown"}),  # H 22: yellow is H ≥ 25 | ≥ 20
        ((60, 0, 0), (0, 255, 60), set(), {"red"}),  # colours need V ≥ 70 | ≥ 35
        ((51, 0, 255), (126, 255, 255), {"blue"}, set()),  # H (51 + 1020)·30/255 = 126: blue is H ≤ 128 | ≤ 124
        ((230, 26, 26), (0, 226, 230), {"red"}, {"red"}),  # Shapes red: red in both
    ]
    hsv = hsv_opencv(torch.tensor([rgb for rgb, *_ in cases]))
    assert hsv.tolist() == [list(expected) for _, expected, *_ in cases]
    for name, column in (("7f5da08", 2), ("723d10e", 3)):
        found = [{c for c in HSV_TABLES[name] if in_color(hsv[i], c, name)} for i in range(len(cases))]
        assert found == [case[column] for case in cases], name
    assert HSV_TABLE == "7f5da08" and HSV_RANGES is HSV_TABLES["7f5da08"]
    assert all(HSV_TABLES[t]["white"] == (((0, 0, 221), (180, 43, 255)),) for t in HSV_TABLES)  # the same in both
    assert all(HSV_TABLES[t]["brown"] == (((6, 43, 35), (25, 255, 255)),) for t in HSV_TABLES)


def test_the_judge_uses_the_current_table_by_default_and_the_first_on_request():
    box = (0.0, 0.0, 1.0, 1.0)
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 60 / 255  # RGB (60, 0, 0): V 60, red only in 723d10e (V ≥ 35, not ≥ 70)
    images[1, 0], images[1, 1] = 200 / 255, 53 / 255  # RGB (200, 53, 0): H 8, red only in 7f5da08 (H ≤ 9, not ≤ 6)
    layouts = [Layout("dim", ["a red bar"], [box]), Layout("orange", ["a red bar"], [box])]
    grounder = StubGrounder(images, {(0, "bar"): [(box, 0.5)], (1, "bar"): [(box, 0.5)]})
    current = CocoMigJudge(grounder, size=None)
    assert current.hsv_table == "7f5da08"
    assert current(images, layouts).labels() == [["wrong colour"], ["ok"]]
    first = CocoMigJudge(grounder, hsv_table="723d10e", size=None)
    assert first(images, layouts).labels() == [["ok"], ["wrong colour"]]
    for bad in (lambda: CocoMigJudge(grounder, hsv_table="HEAD"), lambda: split_phrase("a red car", "723d10"),
                lambda: CocoMigJudge.check(layouts, "old")):
        with pytest.raises(UserError) as err:
            bad()
        message = str(err.value)
        assert "\n" not in message and "unknown COCO-MIG HSV table" in message and "7f5da08, 723d10e" in message
    with pytest.raises(UserError, match="colour 'purple' is not in COCO-MIG's HSV table 723d10e"):
        split_phrase("a purple car", "723d10e")


def test_images_are_resized_to_512_as_cv2_does():
    # Halving is the 2×2 mean, rounded half up (OpenCV: (a + b + c + d + 2) >> 2): 102/4 = 25.5 → 26, 170/4 → 43.
    levels = torch.tensor([[10, 20, 30, 40], [30, 42, 50, 50], [0, 0, 255, 255], [0, 1, 255, 255]], dtype=torch.float)
    half = resize_like_eval_mig(levels.div(255).expand(1, 3, 4, 4), 2)
    assert half.mul(255).round()[0, 0].tolist() == [[26, 43], [0, 255]]
    # Doubling samples at (x + 0.5)/2 − 0.5 (edges clamped): 0, ¼, ¾, 1 of the way from 0 to 100.
    double = resize_like_eval_mig(torch.tensor([[0.0, 100.0]]).div(255).expand(1, 3, 1, 2), 4)
    assert double.mul(255).round()[0, 0].tolist() == [[0, 25, 75, 100]] * 4
    already = torch.rand(1, 3, 4, 4)
    assert resize_like_eval_mig(already, 4) is already and resize_like_eval_mig(already, None) is already
    # the judge resizes by default: the grounder, SAM and the colour check all see 512 × 512
    seen = []

    class Recorder(Grounder):
        def __call__(self, images, phrases):
            seen.append(tuple(images.shape[-2:]))
            return [{p[0]: Grounding(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.9]))} for p in phrases]

    def sam(image, boxes):
        seen.append(tuple(image.shape[-2:]))
        return torch.ones(len(boxes), *image.shape[-2:], dtype=torch.bool)

    image = torch.zeros(1, 3, 64, 96)
    image[0, 2] = 0.9  # blue
    v = CocoMigJudge(Recorder(), sam=sam)(image, [Layout("p", ["a blue cup"], [(0.0, 0.0, 1.0, 1.0)])])
    assert seen == [(512, 512), (512, 512)] and v.labels() == [["ok"]] and v.color_fraction.item() == 1.0


def test_the_grounder_ranks_and_keeps_boxes_as_groundingdinos_predict(tiny_gdino):
    """eval_mig.py's NMS ranks by groundingdino's confidence, the best probability over all tokens, and its boxes
    are as predicted, not clipped: ``score="box"``, ``clip=False``."""
    owner = torch.tensor([-1, 0, -1, -1])  # [CLS] car . [SEP]
    probs = torch.full((2, 4), 0.01)
    probs[0, 1], probs[0, 2] = 0.5, 0.8  # the dot scores above the noun: confidence 0.8 by box, 0.5 by phrase
    probs[1, 1] = 0.6
    boxes = torch.tensor([[0.1, 0.5, 0.4, 0.2], [0.5, 0.5, 0.2, 0.2]])  # the first runs past the left edge: x0 = −0.1
    ours = phrase_detections(torch.logit(probs), boxes, owner, ["car"], 0.25, 0.0, score="box", clip=False)["car"]
    torch.testing.assert_close(ours.scores, torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(ours.boxes, torch.tensor([[-0.1, 0.4, 0.3, 0.6], [0.4, 0.4, 0.6, 0.6]]))
    default = phrase_detections(torch.logit(probs), boxes, owner, ["car"], 0.25, 0.0)["car"]
    torch.testing.assert_close(default.scores, torch.tensor([0.5, 0.6]))
    assert default.boxes[0, 0] == 0.0
    grounder = cocomig_grounder(str(tiny_gdino))
    assert (grounder.score, grounder.clip, grounder.box_threshold, grounder.text_threshold) == ("box", False, 0.25, 0.0)


# ------------------------------------------------------------------------------------- NMS and nouns


def test_nms_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0],  # A .90
                          [0.0, 0.0, 1.0, 0.85],  # B .80: IoU(A, B) = 0.85 > 0.8 → suppressed
                          [0.0, 0.0, 1.0, 0.75],  # C .70: IoU(A, C) = 0.75, IoU(D, C) = 0.375/0.875 → kept
                          [0.5, 0.0, 1.0, 1.0]])  # D .95: IoU(D, A) = 0.5 → kept, first
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7, 0.95]), 0.8).tolist() == [3, 0, 2]
    # Only kept boxes suppress: Y goes (IoU(X, Y) = 0.9/1.1 = 0.82), so Z stays although IoU(Y, Z) = 0.82 too.
    chain = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [0.2, 0.0, 1.2, 1.0]])
    assert nms(chain, torch.tensor([0.9, 0.8, 0.7]), 0.8).tolist() == [0, 2]
    assert nms(chain, torch.tensor([0.9, 0.8, 0.7]), 0.85).tolist() == [0, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.8).tolist() == []


def test_noun_is_the_phrase_minus_article_and_colour():
    assert split_phrase("a red car") == ("red", "car")
    assert split_phrase("The Green parking meter.") == ("green", "parking meter")
    assert split_phrase("brown teddy bear") == ("brown", "teddy bear")
    with pytest.raises(UserError, match="colour 'purple' is not in COCO-MIG's HSV table .*red, blue, green"):
        split_phrase("a purple car")
    with pytest.raises(UserError, match="needs '<colour> <object>'"):
        split_phrase("a red")
    layouts = [Layout("ok", ["red car"], [(0, 0, 1, 1)]), Layout("a pink dog", ["red car", "pink dog"],
                                                                [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])]
    with pytest.raises(UserError) as err:
        parse_layouts(layouts)
    assert str(err.value).startswith("layout 1 ('a pink dog'): phrase 'pink dog': colour 'pink'")


# ---------------------------------------------------------------------------------- the judge by hand


class StubGrounder(Grounder):
    """Answers each (image, noun) query from a table; records every call's phrases."""

    def __init__(self, images, answers):
        self.images, self.answers, self.calls = images, answers, []

    def __call__(self, images, phrases):
        self.calls.append([list(p) for p in phrases])
        out = []
        for image, (noun,) in zip(images, phrases):
            i = next(j for j, known in enumerate(self.images) if torch.equal(known, image))
            found = self.answers.get((i, noun), [])
            out.append({noun: Grounding(torch.tensor([b for b, _ in found]).reshape(-1, 4),
                                        torch.tensor([s for _, s in found], dtype=torch.float32))})
        return out


def test_judge_by_hand():
    asked = [Layout("two squares", ["a red square", "a blue square"], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]),
             Layout("three", ["a green circle", "a yellow triangle", "a white square"],
                    [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1)])]
    drawn = [Layout("drawn", ["red square", "blue square"], asked[0].boxes),
             Layout("drawn", ["blue circle", "white square"], [asked[1].boxes[0], asked[1].boxes[2]])]
    images = render(drawn)
    grounder = StubGrounder(images, {
        (0, "square"): [((0, 0, 0.5, 0.45), 0.9),  # red square: IoU 0.225/0.25 = 0.9, all red inside → ok
                        ((0, 0, 0.5, 0.5), 0.5),  # IoU 1 with the red square, but IoU 0.9 > 0.8 with the first: NMS drops it
                        ((0.5, 0.5, 1, 0.65), 0.6)],  # the blue square's best: IoU 0.075/0.25 = 0.3 → wrong box
        (1, "circle"): [((0, 0, 0.5, 0.5), 0.8)],  # IoU 1, but the circle is blue, not green → wrong colour
        (1, "square"): [((0, 0.5, 0.5, 0.8), 0.7)],  # white square: IoU 0.15/0.25 = 0.6, white inside → ok
    })  # (1, "triangle"): nothing → missed
    v = CocoMigJudge(grounder, batch_size=3, size=None)(images, asked)  # judged at 32 px, not resized to 512
    # one noun per query, each (image, noun) once, in batches of 3
    assert grounder.calls == [[["square"], ["circle"], ["triangle"]], [["square"]]]
    assert v.labels() == [["ok", "wrong box"], ["wrong colour", "missed", "ok"]]
    torch.testing.assert_close(v.iou, torch.tensor([[0.9, 0.3, 0.0], [1.0, 0.0, 0.6]]))
    torch.testing.assert_close(v.color_fraction, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert v.mask.tolist() == [[True, True, False], [True, True, True]]
    m = cocomig_metrics(v, asked)
    # ISR 2/5; mIoU (0.9 + 0.3 [wrong box keeps its IoU] + 0 [wrong colour] + 0 [missed] + 0.6) / 5 = 0.36
    assert m["isr"] == pytest.approx(0.4) and m["miou"] == pytest.approx(0.36) and m["reward"] is None
    assert m["per_level"]["L2"] == pytest.approx({"isr": 0.5, "miou": 0.6, "instances": 2})
    assert m["per_level"]["L3"] == pytest.approx({"isr": 1 / 3, "miou": 0.2, "instances": 3})
    assert m["verdicts"] == {"ok": 2, "missed": 1, "wrong box": 1, "wrong colour": 1}  # the labels above, counted
    both = Verdicts.cat([CocoMigJudge(grounder, size=None)(images[:1], asked[:1]),
                        CocoMigJudge(grounder, size=None)(images[1:], asked[1:])])
    assert cocomig_metrics(both, asked) == m  # batch by batch, then padded and joined: the same


def test_the_colour_bar_is_20_percent_of_the_region():
    box = (0.0, 0.0, 1.0, 0.25)  # 5 rows × 20 columns of a 20×20 image: 100 pixels
    images = torch.full((2, 3, 20, 20), 0.5)
    images[0, :, 0, :] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)  # 20 red pixels of 100 → 0.20 passes
    images[1, :, 0, :19] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)  # 19 → 0.19 fails
    layouts = [Layout("p", ["a red bar"], [box])] * 2
    grounder = StubGrounder(images, {(0, "bar"): [(box, 0.5)], (1, "bar"): [(box, 0.5)]})
    v = CocoMigJudge(grounder, size=None)(images, layouts)  # at 20 px: whole pixels, by hand
    torch.testing.assert_close(v.color_fraction, torch.tensor([[0.20], [0.19]]))
    assert v.labels() == [["ok"], ["wrong colour"]]


def test_sam_masks_replace_the_detected_box_and_are_prompted_with_the_target():
    target, detected = (0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.9)  # IoU 0.9
    image = torch.zeros(1, 3, 10, 10)
    image[0, 2] = 0.9  # blue everywhere …
    image[0, :, 0] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)  # … but the first row, red
    layouts = [Layout("p", ["a red ball"], [target])]
    grounder = StubGrounder(image, {(0, "ball"): [(detected, 0.5)]})
    prompts = []

    def sam(img, boxes):  # "segments" the red row
        prompts.append(boxes.tolist())
        masks = torch.zeros(len(boxes), 10, 10, dtype=torch.bool)
        masks[:, 0] = True
        return masks

    by_box = CocoMigJudge(grounder, size=None)(image, layouts)
    by_sam = CocoMigJudge(grounder, sam=sam, size=None)(image, layouts)
    assert by_box.color_fraction.item() == pytest.approx(10 / 90) and by_box.labels() == [["wrong colour"]]
    assert by_sam.color_fraction.item() == 1.0 and by_sam.labels() == [["ok"]]
    assert prompts == [[list(target)]]


# --------------------------------------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """A random tiny SAM and its processor (64-px input), written with save_pretrained like a hub download."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig, SamVisionConfig
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=1,
                                      image_size=64, patch_size=8, window_size=4, global_attn_indexes=[0],
                                      num_pos_feats=8, mlp_dim=32),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=1,
                                                 iou_head_hidden_dim=16),
    )
    path = tmp_path_factory.mktemp("sam-tiny")
    SamModel(config).save_pretrained(path)
    SamProcessor(SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                      mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
                 ).save_pretrained(path)
    return path


def test_sam_from_a_saved_folder_gives_one_image_sized_mask_per_box(tiny_sam):
    sam = SamSegmenter(str(tiny_sam))
    image = render([Layout("p", ["red square", "blue circle"], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)])])[0]
    boxes = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    masks = sam(image, boxes)
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.bool
    assert torch.equal(sam(image, boxes), masks)  # eval mode: deterministic


def test_sam_folder_without_weights_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        SamSegmenter(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message and "preprocessor_config.json" in message
    assert "hf download facebook/sam-vit-huge" in message and "--sam-model DIR" in message


# ------------------------------------------------------------------------------------------- readers


MIGC_YAML = """\
a photo of a black airplane and a black airplane:
  a black airplane:
  - - 0.390109375
    - 0.27538823529411766
    - 1.0000000000000002
    - 0.6890352941176471
  - - 0.412890625
    - 0.38329411764705884
    - 0.682984375
    - 0.5439058823529412
  coco_id: '6'
a photo of a black bird and a white bird:
  a black bird:
  - - 0.5079374999999999
    - 0.566923076923077
    - 0.6703749999999999
    - 0.7924941724941725
  a white bird:
  - - 0.74815625
    - 0.4516083916083916
    - 0.935546875
    - 0.6666666666666666
  coco_id: '7'
"""


def test_cocomig_yaml_and_txt_from_migc(tmp_path):
    anno = tmp_path / "mig_bench_anno.yaml"
    anno.write_text(MIGC_YAML)
    first, second = read_layouts(anno)
    assert first.prompt == "a photo of a black airplane and a black airplane"
    assert first.phrases == ("a black airplane", "a black airplane")  # one phrase, two boxes: two instances
    assert first.boxes[0] == pytest.approx((0.390109375, 0.27538823529411766, 1.0, 0.6890352941176471))  # 1 + 2e-16 → 1
    assert second.phrases == ("a black bird", "a white bird") and second.boxes[1][0] == pytest.approx(0.74815625)
    # the prompt list gives the order (and repeats) MIGC generates in
    (tmp_path / "mig_bench.txt").write_text("a photo of a black bird and a white bird\n\n"
                                            "a photo of a black airplane and a black airplane\n"
                                            "a photo of a black bird and a white bird\n")
    assert [l.n for l in read_layouts(tmp_path / "mig_bench.txt")] == [2, 2, 2]
    assert read_layouts(tmp_path / "mig_bench.txt")[1] == first
    (tmp_path / "mig_bench.txt").write_text("a photo of a black bird and a white bird\na photo of a cat\n")
    with pytest.raises(LayoutError, match=r"mig_bench.txt:2: prompt 'a photo of a cat' has no entry in mig_bench_anno.yaml"):
        read_layouts(tmp_path / "mig_bench.txt")
    (tmp_path / "other.txt").write_text("a photo of a cat\n")
    with pytest.raises(UserError, match="needs its boxes in other_anno.yaml"):
        read_layouts(tmp_path / "other.txt")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a photo of a red car:\n  a red car:\n  - [0.1, 0.2, 0.3]\n  coco_id: '1'\n")
    with pytest.raises(LayoutError, match=r"bad.yaml: 'a photo of a red car': 'a red car'\[0\]: must be 4 numbers"):
        read_layouts(bad)


def test_cocomig_json_from_mig_bench(tmp_path):
    data = {"0": {"caption": "a photo of a red car and a blue dog", "image_id": "139",
                  "segment": [{"bbox": [0.1, 0.2, 0.5, 0.6], "label": "a red car"},
                              {"bbox": [0.5, 0.1, 0.9, 0.8], "label": "a blue dog"}]},
            "1": {"caption": "x", "segment": [{"bbox": [0.1, 0.2, 0.05, 0.6], "label": "a red car"}]}}
    path = tmp_path / "mig_bench.json"
    path.write_text(json.dumps({"0": data["0"]}))
    (layout,) = read_layouts(path)
    assert layout.phrases == ("a red car", "a blue dog") and layout.boxes[1] == (0.5, 0.1, 0.9, 0.8)
    path.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=r"mig_bench.json: entry 1: boxes\[0\]: x1 \(0.05\) must be greater than x0"):
        read_layouts(path)
    data["1"]["segment"][0]["bbox"] = [0.1, 0.2, 1.5, 0.6]
    path.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=r"entry 1: segment\[0\].bbox: x1 \(1.5\) is outside \[0, 1\]"):
        read_layouts(path)


def test_layoutsam_rows(tmp_path):
    rows = [
        {"global_caption": "A red apple beside a mug.", "width": "1024", "height": 512,
         "bbox_list": "[[0, 0, 512, 256], [512.5, 100, 1024.4, 512]]",  # 0.4 px past the right edge: clipped
         "region_captions": "['a red apple', \"a mug\"]", "detail_region_captions": ["x", "y"], "file_name": "1.jpg"},
        {"global_caption": "A cat.", "width": 100, "height": 100, "bbox_list": [[10, 20, 30, 40]],
         "region_captions": ["a cat"]},
    ]
    path = tmp_path / "layoutsam.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    apple, cat = read_layouts(path)  # auto: a .jsonl whose rows have bbox_list
    assert apple.prompt == "A red apple beside a mug." and apple.phrases == ("a red apple", "a mug")
    assert apple.boxes == pytest.approx([(0, 0, 0.5, 0.5), (512.5 / 1024, 100 / 512, 1.0, 1.0)])
    assert cat.boxes == pytest.approx([(0.1, 0.2, 0.3, 0.4)])
    as_json = tmp_path / "layoutsam.json"
    as_json.write_text(json.dumps(rows))
    assert read_layouts(as_json) == [apple, cat]

    def error(row: dict, **changes) -> str:
        path.write_text(json.dumps({**row, **changes}) + "\n")
        with pytest.raises(LayoutError) as err:
            read_layouts(path, format="layoutsam")
        return str(err.value)

    assert error(rows[1], bbox_list="[[10, 20, 30").endswith("layoutsam.jsonl:1: bbox_list: not a list literal ('[[10, 20, 30')")
    assert error(rows[1], bbox_list=[[10, 20, 30, 40], [1, 2, 3, 4]]).endswith(
        "bbox_list has 2 boxes but region_captions 1 phrases")
    assert error(rows[1], bbox_list=[[10, 20, 102, 40]]).endswith(
        "layoutsam.jsonl:1: bbox_list[0]: x1 (102) is outside the image [0, 100]")
    assert error(rows[1], width="wide").endswith("layoutsam.jsonl:1: width: expected a number of pixels, got 'wide'")
    assert error({k: v for k, v in rows[1].items() if k != "height"}).endswith("layoutsam.jsonl:1: height: missing "
                                                                             "(LayoutSAM-eval rows have global_caption, "
                                                                             "region_captions, bbox_list, width, height)")


def test_format_detection_and_parquet_without_pyarrow(tmp_path, monkeypatch):
    native = tmp_path / "layouts.jsonl"
    write_jsonl(native, [Layout("a red car", ["a red car"], [(0, 0, 1, 1)])])
    assert read_layouts(native)[0].phrases == ("a red car",)
    with pytest.raises(LayoutError, match="layouts.jsonl:1: global_caption: missing"):
        read_layouts(native, format="layoutsam")  # the flag overrides the guess
    unknown = tmp_path / "layouts.json"
    unknown.write_text(json.dumps([{"prompt": "p"}]))
    with pytest.raises(UserError, match="cannot tell which layout format .* pass --format"):
        read_layouts(unknown)
    with pytest.raises(UserError, match="no such file"):
        read_layouts(tmp_path / "missing.yaml")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a machine without pyarrow
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"reading .parquet needs pyarrow \(`pip install pyarrow`\)"):
        read_layouts(tmp_path / "test.parquet")


# ------------------------------------------------------------------------------------------------- CLI


def _cocomig_file(tmp_path):
    """A COCO-MIG annotation file in MIGC's YAML form: an L2 and an L3 layout of Shapes-like instances."""
    data = {"a photo of a red square and a blue circle": {"a red square": [[0.0, 0.0, 0.5, 0.5]],
                                                          "a blue circle": [[0.5, 0.5, 1.0, 1.0]], "coco_id": "1"},
            "a photo of a green triangle and a white square and a black circle": {
                "a green triangle": [[0.0, 0.0, 0.4, 0.4]], "a white square": [[0.5, 0.0, 1.0, 0.4]],
                "a black circle": [[0.2, 0.5, 0.8, 1.0]], "coco_id": "2"}}
    path = tmp_path / "mig_bench_anno.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cli_judges_cocomig_end_to_end(tmp_path, tiny_gdino, tiny_sam, saved_generator, capsys):
    out = tmp_path / "results" / "eval.json"
    out.parent.mkdir()
    assert main(["eval", "--model", str(saved_generator), "--data", str(_cocomig_file(tmp_path)), "--judge", "cocomig",
                 "--reward-model", str(tiny_gdino), "--sam-model", str(tiny_sam), "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"isr", "miou", "reward", "per_level", "verdicts", "hsv_table"} and metrics["reward"] is None
    assert metrics["hsv_table"] == "7f5da08"  # the default table, recorded
    assert {level: block["instances"] for level, block in metrics["per_level"].items()} == {"L2": 2, "L3": 3}
    assert 0 <= metrics["isr"] <= 1 and 0 <= metrics["miou"] <= 1
    report = (out.parent / "eval.html").read_text()
    pictures = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", report)
    assert len(pictures) == 2 and all(base64.b64decode(p).startswith(b"\x89PNG") for p in pictures)
    verdicts = re.findall(r"<td class='[a-z-]+'>(ok|wrong box|wrong colour|missed)</td>", report)
    assert len(verdicts) == 5
    assert metrics["verdicts"] == {label: verdicts.count(label) for label in ("ok", "missed", "wrong box", "wrong colour")}
    assert "a photo of a green triangle and a white square and a black circle" in report
    assert "<td>HSV table</td><td>7f5da08 (the color_dict of eval_mig.py at MIG_Bench commit 7f5da08)</td>" in report
    printed = capsys.readouterr().out
    assert "L3" in printed and f"wrote {out}" in printed
    assert sum(int(n) for n in re.findall(r"(?:ok|wrong box|wrong colour|missed): (\d+)", printed)) == 5


def test_cli_cocomig_errors_are_one_line(tmp_path, capsys):
    data = _cocomig_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--reward-model", str(empty)], "lacks config.json"),
        (["--reward-model", "shapes"], "the cocomig judge grounds nouns with Grounding DINO"),
        (["--reward", "gdino"], "--reward has no effect with --judge cocomig"),
    ]
    for extra, expected in cases:
        assert main(["eval", "--data", str(data), "--judge", "cocomig", *extra, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (extra, err)
    purple = tmp_path / "purple.yaml"
    purple.write_text(yaml.safe_dump({"a purple car": {"a purple car": [[0.1, 0.1, 0.5, 0.5]], "coco_id": "3"}}))
    assert main(["eval", "--data", str(purple), "--judge", "cocomig", "--reward-model", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "colour 'purple' is not in COCO-MIG's HSV table" in err[0]  # before any weights load
    assert main(["eval", "--data", str(data), "--sam-model", str(empty)]) == 2
    assert "--sam-model is for --judge cocomig" in capsys.readouterr().err


def test_cli_hsv_table_reaches_the_judge(tmp_path, tiny_gdino):
    from diffrl.cli import _eval_judge, build_parser
    from diffrl.eval.readers import read_layouts

    data = _cocomig_file(tmp_path)
    for extra, expected in (([], "7f5da08"), (["--hsv-table", "723d10e"], "723d10e")):
        args = build_parser().parse_args(["eval", "--data", str(data), "--judge", "cocomig", "--reward-model",
                                          str(tiny_gdino), *extra])
        judge = _eval_judge(args, read_layouts(data))
        assert isinstance(judge, CocoMigJudge) and judge.hsv_table == expected


def test_cli_bad_hsv_table_is_one_line(tmp_path, capsys):
    data, empty = _cocomig_file(tmp_path), tmp_path / "empty"
    empty.mkdir()
    # an unknown table fails before the (missing) weights load
    assert main(["eval", "--data", str(data), "--judge", "cocomig", "--hsv-table", "063ec45", "--reward-model",
                 str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown COCO-MIG HSV table '063ec45': choose one of 7f5da08, 723d10e" in err[0]
    assert main(["eval", "--data", str(data), "--hsv-table", "723d10e"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hsv-table is for --judge cocomig" in err[0]


def test_cli_without_detector_weights_offline_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffrl.cli", "eval", "--data", str(_cocomig_file(tmp_path)), "--judge", "cocomig",
         "--out", str(tmp_path / "eval.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "hf download IDEA-Research/grounding-dino-tiny" in lines[0] and "--reward-model DIR" in lines[0]
    assert not (tmp_path / "eval.json").exists()
