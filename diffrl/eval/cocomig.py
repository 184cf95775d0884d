"""COCO-MIG's judge (MIGC, CVPR 2024): is each instance in its box, in the colour it asked for?

The protocol is the benchmark's own evaluation script, ``eval_mig.py`` of LeyRio/MIG_Bench (functions
``check_on_image`` and ``check_on_color_cv``; compared line by line against commit 7f5da08 of 2024-03-03, the
script's last change), the COCO-MIG repository that MIGC's README (limuloo/MIGC) points to. Per instance, whose
phrase is ``"[a|an|the] <colour> <noun>"``:

0. The image is resized to 512×512 first (`IMAGE_SIZE`), bilinearly as ``cv2.resize`` does; every step below
   sees that image.
1. Ground the noun alone (``"car"``, not ``"a red car"``) in the image with box threshold 0.25, then
   class-agnostic non-maximum suppression at IoU 0.8 over the boxes found, ranked by each box's best token
   probability (groundingdino's ``predict`` confidence).
2. The detection with the best IoU against the target box is the instance's. Nothing found: *missed*;
   best IoU < 0.5: *wrong box*.
3. Otherwise check the colour inside the object. Its mask is SAM's, prompted with the target box (of SAM's
   three masks the one it scores best), as eval_mig.py does; without SAM, the pixels of the detected box.
   The image goes to HSV exactly as OpenCV converts 8-bit RGB (`hsv_opencv`); the colour passes when at
   least 20% of the mask's pixels fall in the HSV range(s) for it (eval_mig.py fails it when the share is
   < 0.2, or the mask is empty), else *wrong colour*.

success = box right ∧ colour right (*ok*). `cocomig_metrics` summarises with
`diffrl.eval.metrics.instance_metrics`, per level (instance count; COCO-MIG has L2–L6) and pooled:
ISR = successes / instances; mIoU = mean best IoU where a failed colour check counts 0 — and, as in
eval_mig.py (which returns ``ovmax`` before any colour check), an instance whose box is wrong keeps its
IoU (< 0.5); a missed one counts 0.

HSV tables (`HSV_TABLES`, each named by the MIG_Bench commit whose eval_mig.py runs it):
- ``7f5da08`` (the default, `HSV_TABLE`): the ``color_dict`` eval_mig.py uses since commit 7f5da08
  (unchanged at the repository's head, 063ec45).
- ``723d10e``: the ``color_dict`` of the first published eval_mig.py (commit 723d10e), which 7f5da08 keeps
  commented out above its new one.
Both cover the same seven colours (white and brown are the same in both; 7f5da08 moved red, blue, green,
yellow and black). A phrase whose colour is not in the chosen table is a one-line UserError naming the table,
raised before any image is made (eval_mig.py would stop on a KeyError). `diffrl eval --judge cocomig
--hsv-table NAME` picks one; eval.json (``hsv_table``) and the HTML report record which.

What changed from eval_mig.py (commit 7f5da08):
- Grounding DINO runs through transformers (`GroundingDinoGrounder`; IDEA-Research/grounding-dino-tiny holds
  the same SwinT-OGC weights) and SAM through transformers' ``SamModel`` (`SamSegmenter`), not the
  groundingdino / segment_anything packages; their pre- and post-processing are transformers' own.
- Text threshold: eval_mig.py passes 0.25, but groundingdino's ``predict`` uses it only to pick the words of
  each box's label and never drops a box (a label that comes out empty, when only the query's dot passes,
  stops eval_mig.py with an IndexError in ``Model.find_index``). Our grounder drops a box whose phrase score
  is under its text threshold, so the judge grounds with text threshold 0 (`TEXT_THRESHOLD`), which keeps the
  same boxes and never stops.
- IoUs are computed in float32 on normalised boxes, eval_mig.py's in float64 on pixel boxes: the same up to
  rounding.
- The resize to 512 (`resize_like_eval_mig`) computes in floating point: OpenCV's exact result when halving
  (1024 → 512), within one 8-bit level of its fixed-point bilinear otherwise. It applies to any image that is
  not 512×512 (eval_mig.py resizes when the height is not 512, and fails further on for a 512-high image of
  another width).
- The generated image is judged as its 8-bit rounding (`to_uint8`), where eval_mig.py reads the saved PNG.
- Without ``--sam-model`` the object's mask is the detected box's pixels; eval_mig.py always runs SAM.
- Phrases: an optional article (a/an/the), then the colour, then the noun; lower-cased, a trailing dot dropped.
  eval_mig.py drops the first word whatever it is, takes the second as the colour and the rest as the noun.
- Instances sharing a noun in one image share one query (eval_mig.py repeats the same query per instance, with
  the same result). As there, instances are judged independently: two may claim the same detection.
- Only ISR, mIoU (per level and pooled) and the verdict counts are reported; eval_mig.py's image success ratio
  (``--need_sucess_ratio``) and CLIP scores are not computed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffrl.boxes import box_iou, nms
from diffrl.errors import UserError
from diffrl.eval.metrics import instance_metrics, verdict_counts
from diffrl.layout import Layout
from diffrl.rewards.grounder import GROUNDING_DINO, Grounder, Grounding, load_pretrained

BOX_THRESHOLD = 0.25  # eval_mig.py's box_t
TEXT_THRESHOLD = 0.0  # drops no box, like eval_mig.py's text_t = 0.25 inside groundingdino (module doc)
NMS_IOU = 0.8  # eval_mig.py's NMS_THRESHOLD
IOU_THRESHOLD = 0.5  # eval_mig.py's miou_threshold
COLOR_FRACTION = 0.2  # eval_mig.py: the colour fails when under 20% of the mask is in its range
IMAGE_SIZE = 512  # eval_mig.py: cv2.resize(image, dsize=(512, 512)) before judging
SAM_MODEL = "facebook/sam-vit-huge"  # the benchmark's SAM: ViT-H (sam_vit_h_4b8939.pth)
ARTICLES = ("a", "an", "the")
VERDICTS = ("ok", "wrong box", "wrong colour", "missed")

HsvRanges = tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]
# eval_mig.py's color_dict tables, verbatim, named by the MIG_Bench commit that runs each (module doc): OpenCV
# 8-bit HSV (H in [0, 180], S and V in [0, 255]); each colour is one or more [lower, upper] boxes, bounds
# inclusive as cv2.inRange. Red wraps around H = 0. (7f5da08 lists yellow before green; the order is immaterial.)
HSV_TABLES: dict[str, dict[str, HsvRanges]] = {
    "7f5da08": {
        "red": (((0, 50, 70), (9, 255, 255)), ((159, 50, 70), (180, 255, 255))),
        "blue": (((90, 50, 70), (128, 255, 255)),),
        "green": (((36, 50, 70), (89, 255, 255)),),
        "yellow": (((25, 50, 70), (35, 255, 255)),),
        "black": (((0, 0, 0), (180, 255, 30)),),
        "white": (((0, 0, 221), (180, 43, 255)),),
        "brown": (((6, 43, 35), (25, 255, 255)),),
    },
    "723d10e": {
        "red": (((0, 43, 35), (6, 255, 255)), ((156, 43, 35), (180, 255, 255))),
        "blue": (((78, 43, 35), (124, 255, 255)),),
        "green": (((35, 43, 35), (77, 255, 255)),),
        "yellow": (((20, 43, 35), (34, 255, 255)),),
        "black": (((0, 0, 0), (180, 255, 35)),),
        "white": (((0, 0, 221), (180, 43, 255)),),
        "brown": (((6, 43, 35), (25, 255, 255)),),
    },
}
HSV_TABLE = "7f5da08"  # the default: the table eval_mig.py runs now
HSV_RANGES = HSV_TABLES[HSV_TABLE]  # the default table's ranges


def table_ranges(name: str) -> dict[str, HsvRanges]:
    """The ranges of the table ``name`` (`HSV_TABLES`); an unknown name is a one-line UserError."""
    if name not in HSV_TABLES:
        raise UserError(f"unknown COCO-MIG HSV table {name!r}: choose one of {', '.join(HSV_TABLES)} (the MIG_Bench "
                        f"commits whose eval_mig.py runs them; default {HSV_TABLE}, the current one)")
    return HSV_TABLES[name]


Segmenter = Callable[[Tensor, Tensor], Tensor]  # (image [3, H, W] in [0, 1], boxes [n, 4] normalised) → masks [n, H, W] bool


def split_phrase(phrase: str, table: str = HSV_TABLE) -> tuple[str, str]:
    """``"a red car"`` → ("red", "car"): an optional article, the colour word, then the noun (all the rest) —
    eval_mig.py's split, except that only an article is dropped (module doc). A colour outside the HSV table
    ``table`` or a phrase without a noun is a UserError."""
    colors = table_ranges(table)
    words = phrase.strip().rstrip(".").lower().split()
    if words and words[0] in ARTICLES:
        words = words[1:]
    if len(words) < 2:
        raise UserError(f"phrase {phrase!r}: COCO-MIG's judge needs '<colour> <object>', e.g. 'a red car'")
    if words[0] not in colors:
        raise UserError(f"phrase {phrase!r}: colour {words[0]!r} is not in COCO-MIG's HSV table {table} "
                        f"({', '.join(colors)}); the cocomig judge checks only those colours")
    return words[0], " ".join(words[1:])


def parse_layouts(layouts: Sequence[Layout], table: str = HSV_TABLE) -> list[list[tuple[str, str]]]:
    """Per layout, per instance (colour, noun); the first bad phrase is a UserError naming its layout."""
    table_ranges(table)  # an unknown table is the error, not each phrase's colour
    parsed = []
    for i, layout in enumerate(layouts):
        try:
            parsed.append([split_phrase(p, table) for p in layout.phrases])
        except UserError as err:
            prompt = layout.prompt if len(layout.prompt) <= 60 else layout.prompt[:57] + "..."
            raise UserError(f"layout {i} ({prompt!r}): {err}") from None
    return parsed


def hsv_opencv(rgb: Tensor) -> Tensor:
    """8-bit RGB [..., 3] (integers 0–255) → HSV [..., 3] long, bit for bit as OpenCV's ``cvtColor`` to HSV
    computes it for 8-bit images: H in [0, 180), S and V in [0, 255].

    Adapted from OpenCV's ``RGB2HSV_b`` (modules/imgproc/src/color_hsv.simd.hpp): the same fixed-point
    arithmetic (12-bit shift, divisions through tables rounded half to even), written in torch."""
    r, g, b = rgb.long().unbind(-1)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    sdiv = torch.where(v > 0, torch.round((255 << 12) / v.double().clamp(min=1)), 0).long()  # sdiv_table[v]
    hdiv = torch.where(diff > 0, torch.round((180 << 12) / (6 * diff.double().clamp(min=1))), 0).long()  # hdiv_table180
    s = torch.div(diff * sdiv + (1 << 11), 1 << 12, rounding_mode="floor")
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.div(h * hdiv + (1 << 11), 1 << 12, rounding_mode="floor")
    return torch.stack([torch.where(h < 0, h + 180, h), s, v], -1)


def to_uint8(image: Tensor) -> Tensor:
    """[3, H, W] in [0, 1] → [H, W, 3] uint8 on the CPU (rounded, as a saved PNG holds it)."""
    return image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def resize_like_eval_mig(images: Tensor, size: int | None = IMAGE_SIZE) -> Tensor:
    """images [B, 3, H, W] in [0, 1] → [B, 3, size, size]: taken to 8-bit levels, resized bilinearly with
    cv2.resize's geometry (pixel centres aligned, no antialiasing: ``cv2.INTER_LINEAR``) and rounded half up
    back to 8-bit levels, as eval_mig.py resizes what it reads. Exactly OpenCV's result when halving (1024 →
    512, which OpenCV runs as the 2×2 mean); otherwise within one level of its fixed-point arithmetic.
    Unchanged when already size × size or ``size`` is None."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    levels = images.detach().float().clamp(0, 1).mul(255).round()
    resized = torch.nn.functional.interpolate(levels, size=(size, size), mode="bilinear", align_corners=False,
                                              antialias=False)
    return resized.add(0.5).floor().clamp(0, 255).div(255)  # rounded half up, as OpenCV's fixed point


def in_color(hsv: Tensor, color: str, table: str = HSV_TABLE) -> Tensor:
    """hsv [..., 3] → bool [...]: inside any of ``color``'s ranges in the HSV table ``table``, bounds inclusive
    (cv2.inRange)."""
    hits = torch.zeros(hsv.shape[:-1], dtype=torch.bool, device=hsv.device)
    for lower, upper in table_ranges(table)[color]:
        hits |= ((hsv >= torch.tensor(lower, device=hsv.device)) & (hsv <= torch.tensor(upper, device=hsv.device))).all(-1)
    return hits


def color_fraction(hsv: Tensor, mask: Tensor, color: str, table: str = HSV_TABLE) -> float:
    """hsv [H, W, 3] (`hsv_opencv`), mask [H, W] bool → share of the mask's pixels in ``color``'s range of the
    HSV table ``table`` (0 for an empty mask, which therefore fails the check as in eval_mig.py)."""
    n = int(mask.sum())
    return float((in_color(hsv, color, table) & mask).sum()) / n if n else 0.0


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """boxes [n, 4] normalised xyxy → [n, height, width] bool: the pixels whose centre lies in the box."""
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    x0, y0, x1, y1 = (boxes[:, i].float().cpu().view(-1, 1, 1) for i in range(4))
    return (x[None, None, :] >= x0) & (x[None, None, :] < x1) & (y[None, :, None] >= y0) & (y[None, :, None] < y1)


@dataclass
class Verdicts:
    """The judge's findings per instance, padded to K = the batch's largest instance count."""

    iou: Tensor  # [B, K] best IoU of a detection with the target box (0: nothing found)
    boxes: Tensor  # [B, K, 4] that detection, normalised xyxy (zeros: nothing found)
    found: Tensor  # [B, K] bool, the noun was grounded at least once
    box_ok: Tensor  # [B, K] bool, found ∧ iou ≥ 0.5
    color_fraction: Tensor  # [B, K] share of the object's pixels in the asked colour's range (0: not checked)
    color_ok: Tensor  # [B, K] bool, box_ok ∧ color_fraction ≥ 0.2
    mask: Tensor  # [B, K] bool, a real instance (False: padding)

    @property
    def success(self) -> Tensor:
        """[B, K] bool: COCO-MIG's instance success, box and colour right."""
        return self.box_ok & self.color_ok

    def labels(self) -> list[list[str]]:
        """Per image, per real instance: "ok", "wrong box", "wrong colour" or "missed"."""
        out = []
        for i in range(self.mask.shape[0]):
            row = []
            for k in range(int(self.mask[i].sum())):
                row.append("ok" if self.success[i, k] else "wrong colour" if self.box_ok[i, k]
                           else "wrong box" if self.found[i, k] else "missed")
            out.append(row)
        return out

    @classmethod
    def empty(cls, b: int, k: int) -> "Verdicts":
        zeros, false = torch.zeros(b, k), torch.zeros(b, k, dtype=torch.bool)
        return cls(zeros.clone(), torch.zeros(b, k, 4), false.clone(), false.clone(), zeros.clone(), false.clone(),
                   false.clone())

    @classmethod
    def cat(cls, parts: Sequence["Verdicts"]) -> "Verdicts":
        """Batches of verdicts → one, padded to the largest K."""
        k = max(p.mask.shape[1] for p in parts)

        def pad(t: Tensor) -> Tensor:
            widths = (0, 0, 0, k - t.shape[1]) if t.ndim == 3 else (0, k - t.shape[1])
            return torch.nn.functional.pad(t, widths)

        return cls(**{f.name: torch.cat([pad(getattr(p, f.name)) for p in parts]) for f in fields(cls)})


def cocomig_metrics(verdicts: Verdicts, layouts: Sequence[Layout]) -> dict:
    """Verdicts of ``layouts`` → the summary block ``M`` = {"isr", "miou", "reward", "per_level", "verdicts"} of
    summary.json, through `instance_metrics` (mIoU counts an instance's IoU unless its colour check failed) and
    `verdict_counts` (the instance count of each of `Verdicts.labels`). ``reward`` is None: the judge gives
    verdicts, not a reward."""
    not_refuted = ~verdicts.box_ok | verdicts.color_ok  # a wrong box keeps its IoU, as eval_mig.py's ovmax
    m = instance_metrics(verdicts.success, verdicts.iou, not_refuted, verdicts.mask, [layout.n for layout in layouts])
    counts = verdict_counts(verdicts.success, verdicts.iou, verdicts.found, verdicts.color_ok, verdicts.mask,
                            attribute="wrong colour")
    return {"isr": m["isr"], "miou": m["miou"], "reward": None, "per_level": m["per_level"], "verdicts": counts}


class CocoMigJudge:
    """``judge(images [B, 3, H, W] in [0, 1], layouts) -> Verdicts`` by COCO-MIG's protocol (module doc).

    ``grounder``: queried with one noun per image entry (`cocomig_grounder` builds Grounding DINO with the
    protocol's thresholds); ``sam``: a `Segmenter` (e.g. `SamSegmenter`) prompted with the target boxes, or
    None to use the detected boxes as masks; ``batch_size``: (image, noun) queries per grounder call;
    ``hsv_table``: the colour ranges, a name in `HSV_TABLES` (an unknown one is a UserError); ``size``: the
    side images are resized to before judging (`resize_like_eval_mig`; None: judged at their own size). A
    call's ``progress`` shows a bar over those grounder calls.
    """

    def __init__(self, grounder: Grounder, sam: Segmenter | None = None, batch_size: int = 16,
                 hsv_table: str = HSV_TABLE, size: int | None = IMAGE_SIZE):
        table_ranges(hsv_table)  # the name is checked here, not at the first colour check
        self.grounder = grounder
        self.sam = sam
        self.batch_size = batch_size
        self.hsv_table = hsv_table
        self.size = size

    @staticmethod
    def check(layouts: Sequence[Layout], hsv_table: str = HSV_TABLE) -> None:
        """A UserError for an unknown ``hsv_table`` or the first phrase the judge cannot read with it — before any
        image is made or weights load."""
        parse_layouts(layouts, hsv_table)

    @torch.no_grad()
    def __call__(self, images: Tensor, layouts: Sequence[Layout], progress: bool = False) -> Verdicts:
        if images.ndim != 4 or images.shape[0] != len(layouts):
            raise ValueError(f"got images of shape {tuple(images.shape)} for {len(layouts)} layouts")
        parsed = parse_layouts(layouts, self.hsv_table)
        images = resize_like_eval_mig(images, self.size)
        found = self.ground(images, parsed, progress)
        v = Verdicts.empty(len(layouts), max(layout.n for layout in layouts))
        for i, (layout, instances) in enumerate(zip(layouts, parsed)):
            targets = torch.tensor(layout.boxes)  # [n, 4]
            v.mask[i, : layout.n] = True
            for k, (_, noun) in enumerate(instances):
                detections = found[i, noun]
                if len(detections.scores):
                    ious = box_iou(targets[k : k + 1], detections.boxes)[0]  # [M]
                    best = int(ious.argmax())
                    v.iou[i, k], v.boxes[i, k], v.found[i, k] = ious[best], detections.boxes[best], True
            v.box_ok[i] = v.found[i] & (v.iou[i] >= IOU_THRESHOLD)
            self.check_colours(images[i], targets, [color for color, _ in instances], v, i)
        return v

    def check_colours(self, image: Tensor, targets: Tensor, colors: Sequence[str], v: Verdicts, i: int) -> None:
        """Image ``i``'s colour checks, filled into ``v``, for its instances whose box is right: the share of the
        object's pixels (SAM's mask from the target box, else the detected box) in its colour's range."""
        checked = v.box_ok[i].nonzero().flatten().tolist()
        if not checked:
            return
        if self.sam is not None:
            masks = self.sam(image, targets[checked]).cpu()  # [n, H, W], prompted with the target boxes
        else:
            masks = box_masks(v.boxes[i, checked], image.shape[-2], image.shape[-1])
        hsv = hsv_opencv(to_uint8(image))  # [H, W, 3]
        for k, mask in zip(checked, masks):
            v.color_fraction[i, k] = color_fraction(hsv, mask, colors[k], self.hsv_table)
        v.color_ok[i] = v.box_ok[i] & (v.color_fraction[i] >= COLOR_FRACTION)

    def ground(self, images: Tensor, parsed: Sequence[Sequence[tuple[str, str]]],
               progress: bool = False) -> dict[tuple[int, str], Grounding]:
        """Every distinct noun of every image grounded alone (one phrase per query), NMS applied:
        {(image index, noun): candidates}."""
        queries = [(i, noun) for i, instances in enumerate(parsed) for noun in dict.fromkeys(n for _, n in instances)]
        found = {}
        chunks = range(0, len(queries), self.batch_size)
        for start in tqdm(chunks, desc="cocomig", disable=not progress, leave=False):
            chunk = queries[start : start + self.batch_size]
            index = torch.tensor([i for i, _ in chunk], device=images.device)
            results = self.grounder(images[index], [[noun] for _, noun in chunk])
            for (i, noun), result in zip(chunk, results):
                d = result[noun]
                keep = nms(d.boxes, d.scores, NMS_IOU)
                found[i, noun] = Grounding(d.boxes[keep], d.scores[keep])
        return found


def cocomig_grounder(model: str | None = None, device: str | torch.device | None = None) -> Grounder:
    """Grounding DINO (default IDEA-Research/grounding-dino-tiny) with the protocol's thresholds, ranking its boxes
    by their box score and leaving them unclipped, as groundingdino's ``predict`` gives them to eval_mig.py."""
    from diffrl.rewards.grounder import GroundingDinoGrounder

    if model == "shapes":
        raise UserError("the cocomig judge grounds nouns with Grounding DINO; the Shapes detector needs whole "
                        "'<color> <shape>' phrases: pass a Grounding DINO folder as --reward-model, or use --judge reward")
    return GroundingDinoGrounder(model or GROUNDING_DINO, device, BOX_THRESHOLD, TEXT_THRESHOLD, score="box", clip=False)


def load_sam(model: str):
    """(processor, model) of SAM from a local folder, the Hugging Face cache or the hub (`load_pretrained`);
    missing weights are a one-line UserError naming ``--sam-model``."""
    from transformers import SamModel, SamProcessor

    def load(source: str, local_files_only: bool):
        processor = SamProcessor.from_pretrained(source, local_files_only=local_files_only)
        return processor, SamModel.from_pretrained(source, local_files_only=local_files_only).eval()

    needed = ["config.json", "model.safetensors|pytorch_model.bin|model.safetensors.index.json",
              "preprocessor_config.json|processor_config.json"]
    return load_pretrained("SAM", model, SAM_MODEL, needed, load, pass_as="SamSegmenter(DIR) (CLI: --sam-model DIR)")


class SamSegmenter:
    """SAM through transformers (``SamModel`` + ``SamProcessor``), prompted with one box per object:
    ``segmenter(image [3, H, W] in [0, 1], boxes [n, 4] normalised xyxy) -> masks [n, H, W] bool``.
    Of its three masks per box it keeps the one with the highest predicted IoU, as eval_mig.py does with
    segment_anything's ``SamPredictor.predict(box=..., multimask_output=True)``. ``device``: where SAM runs
    (None: the image's device)."""

    def __init__(self, model: str = SAM_MODEL, device: str | torch.device | None = None):
        self.processor, self.model = load_sam(model)
        self.device = torch.device(device) if device is not None else None

    @torch.no_grad()
    def __call__(self, image: Tensor, boxes: Tensor) -> Tensor:
        device = self.device or image.device
        self.model.to(device)
        height, width = image.shape[-2:]
        pixels = boxes.float().cpu() * torch.tensor([width, height, width, height])
        inputs = self.processor(images=[to_uint8(image).numpy()], input_boxes=[pixels.tolist()], return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(device), input_boxes=inputs["input_boxes"].to(device),
                         multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]  # [n, 3, H, W]
        best = out.iou_scores[0].argmax(-1).cpu()  # [n]
        return masks[torch.arange(len(best)), best].bool()
