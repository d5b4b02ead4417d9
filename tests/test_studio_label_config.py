"""Label configs: the box control, its image key, label ↔ class mapping, unknown labels."""

from __future__ import annotations

import logging

import pytest

from magral_core.studio.label_config import (
    LabelConfig,
    LabelConfigError,
    class_index,
    log_unknown,
    merge_class_names,
    parse_label_config,
    select_rectangles,
)

BCCD = """<View>
  <Header value="Blood cells"/>
  <Image name="img" value="$picture" zoom="true"/>
  <Choices name="quality" toName="img"><Choice value="good"/></Choices>
  <RectangleLabels name="cells" toName="img">
    <Label value="RBC" background="red"/><Label value="WBC"/><Label value="Platelets"/>
  </RectangleLabels>
</View>"""


def item(label: str, *, from_name: str = "cells", kind: str = "rectanglelabels") -> dict:
    return {
        "from_name": from_name,
        "to_name": "img",
        "type": kind,
        "original_width": 640,
        "original_height": 480,
        "value": {"x": 1, "y": 2, "width": 3, "height": 4, "rectanglelabels": [label]},
    }


def test_parse_finds_the_box_control_image_key_and_labels() -> None:
    assert parse_label_config(BCCD) == LabelConfig("cells", "img", "picture", ("RBC", "WBC", "Platelets"))


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("", "expected a label config"),
        ("<View><Image", "invalid XML"),
        (
            '<View><Image name="i" value="$image"/>'
            '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
            "found controls: Choices(c)",
        ),
        (
            '<View><Text name="t" value="$text"/><RectangleLabels name="r" toName="t"><Label value="a"/>'
            "</RectangleLabels></View>",
            "bound (toName) to an <Image>",
        ),
        (
            '<View><Image name="i" value="image"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
            "</RectangleLabels></View>",
            'value="$image"',
        ),
        (
            '<View><Image name="i" value="$image"/>'
            '<RectangleLabels name="r" toName="i"></RectangleLabels></View>',
            "at least one <Label>",
        ),
    ],
)
def test_parse_errors_say_what_was_expected_and_found(xml: str, expected: str) -> None:
    with pytest.raises(
        LabelConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")
    ):
        parse_label_config(xml)


def test_class_names_only_grow_and_keep_their_indices() -> None:
    assert merge_class_names((), ["RBC", "WBC"]) == ("RBC", "WBC")
    merged = merge_class_names(("RBC", "WBC"), ["Platelets", "WBC", "RBC"])
    assert merged == ("RBC", "WBC", "Platelets")
    assert merge_class_names(merged, ["WBC"]) == merged  # a removed label keeps its index
    assert class_index(merged) == {"RBC": 0, "WBC": 1, "Platelets": 2}


def test_select_rectangles_maps_labels_and_counts_unknown_ones() -> None:
    config = parse_label_config(BCCD)
    result = [
        item("WBC"),
        item("Ghost"),
        item("RBC"),
        item("Ghost"),
        item("RBC", from_name="other"),
        {"type": "choices", "from_name": "quality", "value": {"choices": ["good"]}},
        {"type": "rectanglelabels", "from_name": "cells", "value": {"x": 1}},
    ]
    rects = select_rectangles(result, config, ("RBC", "WBC", "Platelets"))
    assert rects.labels == (1, 0)
    assert rects.values[0]["width"] == 3 and rects.original_sizes == ((640, 480), (640, 480))
    assert rects.unknown == {"Ghost": 2, "<none>": 1}


def test_select_rectangles_of_an_empty_annotation() -> None:
    rects = select_rectangles([], parse_label_config(BCCD), ("RBC",))
    assert rects.values == () and rects.labels == () and rects.unknown == {}


def test_unknown_labels_give_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="magral_core.studio.label_config"):
        log_unknown({"Ghost": 2, "Alien": 1}, project=3, task=9)
        log_unknown({}, project=3)
    assert len(caplog.records) == 1
    assert "project=3 task=9" in caplog.text and "Alien×1, Ghost×2" in caplog.text
