"""Layout validation names the field, the instance and (from a file) the line."""

import json
import math

import pytest

from diffrl.layout import Layout, LayoutError, read_jsonl, write_jsonl

GOOD = {"prompt": "a red square and a blue circle", "phrases": ["red square", "blue circle"],
        "boxes": [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]]}


def test_valid_layout_roundtrips_through_jsonl(tmp_path):
    layout = Layout.from_dict(GOOD)
    assert layout.n == 2 and layout.boxes[1] == (0.5, 0.5, 0.9, 0.8)
    path = tmp_path / "l.jsonl"
    write_jsonl(path, [layout, layout])
    assert read_jsonl(path) == [layout, layout]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"boxes": [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 1.2, 0.8]]}, "boxes[1]: x1 (1.2) is outside [0, 1]"),
        ({"boxes": [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.5, 0.8]]}, "boxes[1]: x1 (0.5) must be greater than x0 (0.5)"),
        ({"boxes": [[0.1, 0.3, 0.4, 0.2], [0.5, 0.5, 0.9, 0.8]]}, "boxes[0]: y1 (0.2) must be greater than y0 (0.3)"),
        ({"phrases": ["red square", " "]}, "phrases[1]: must be a non-empty string"),
        ({"phrases": ["red square"]}, "1 phrases but 2 boxes"),
        ({"boxes": [[0.1, 0.1, 0.4, math.nan], [0.5, 0.5, 0.9, 0.8]]}, "boxes[0]: y1 is nan"),
        ({"boxes": [[0.1, 0.1, 0.4], [0.5, 0.5, 0.9, 0.8]]}, "boxes[0]: must be 4 numbers"),
        ({"prompt": ""}, "prompt: must be a non-empty string"),
    ],
)
def test_bad_layouts_name_field_and_instance(change, message):
    with pytest.raises(LayoutError) as err:
        Layout.from_dict({**GOOD, **change})
    assert message in str(err.value)


def test_file_errors_name_the_line(tmp_path):
    path = tmp_path / "layouts.jsonl"
    bad = {**GOOD, "boxes": [[0.1, 0.1, 0.4, 0.4], [0.9, 0.5, 0.2, 0.8]]}
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(LayoutError, match=r"layouts\.jsonl:3: boxes\[1\]: x1 \(0\.2\) must be greater than x0 \(0\.9\)"):
        read_jsonl(path)
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(LayoutError, match=r"layouts\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"prompt": "x", "phrases": ["a"]}) + "\n")
    with pytest.raises(LayoutError, match=r"layouts\.jsonl:1: boxes: missing"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(LayoutError, match="has no layouts"):
        read_jsonl(path)


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)
