"""Label Studio label configs: which control draws boxes on which image, and label names ↔ class indices.

Pure: parses the XML with label-studio-sdk's `LabelInterface` (offline) and maps records; no I/O.

Class indices are 0-based positions in a version's `class_names`. The mapping only grows: labels added to
the config later are appended (existing indices never move), so a detector trained on an older version keeps
its meaning and only the new classes need a fresh head on the next round.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from magral_core.errors import UserError

log = logging.getLogger(__name__)


class LabelConfigError(UserError):
    """A label config that is not XML, or has no RectangleLabels control bound to an Image."""


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a Label Studio label config a box detector needs.

    `from_name`: the RectangleLabels control's name; `to_name`: the Image object's name; `image_key`: the task
    data key holding the image (`$image` → "image"); `labels`: label names in config order.
    """

    from_name: str
    to_name: str
    image_key: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Rectangles:
    """The rectangles of one annotation that belong to the detector's control, with class indices.

    `values`: the LS `value` dicts (percent boxes) kept; `labels`: their class indices, same order;
    `original_sizes`: (width, height) per kept item when LS recorded it, else None;
    `unknown`: label name → count of items dropped because the name is not a known class.
    """

    values: tuple[Mapping[str, Any], ...]
    labels: tuple[int, ...]
    original_sizes: tuple[tuple[int, int] | None, ...]
    unknown: Mapping[str, int] = field(default_factory=dict)


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a label config; the first RectangleLabels control bound to an Image wins.

    Raises LabelConfigError saying what was expected and what was found (not XML; no RectangleLabels; bound
    to something that is not an Image; an Image whose value is not `$key`; no labels).
    """
    from label_studio_sdk.label_interface import LabelInterface

    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(f"expected a label config (XML string), found {xml!r:.80}")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several XML/syntax error types
        raise LabelConfigError(f"expected a label config in XML, found invalid XML: {exc}") from None
    objects = {obj.name: obj for obj in interface.objects}
    controls = list(interface.controls)
    found = ", ".join(f"{c.tag}({c.name})" for c in controls) or "none"
    for control in controls:
        if control.tag != "RectangleLabels":
            continue
        for target in control.to_name or ():
            obj = objects.get(target)
            if obj is None or obj.tag != "Image":
                continue
            value = str(obj.value or "")
            if not value.startswith("$") or len(value) < 2:
                raise LabelConfigError(
                    f'expected the Image "{obj.name}" to read its URL from task data like value="$image", '
                    f"found value={value!r}"
                )
            labels = tuple(str(label) for label in control.labels or ())
            if not labels:
                raise LabelConfigError(
                    f'expected at least one <Label> inside RectangleLabels "{control.name}", found none'
                )
            return LabelConfig(control.name, obj.name, value[1:], labels)
    raise LabelConfigError(
        f"expected a <RectangleLabels> control bound (toName) to an <Image> object, found controls: {found}"
    )


def merge_class_names(previous: Sequence[str], labels: Iterable[str]) -> tuple[str, ...]:
    """Class names of the next version: the previous ones in place, then new labels in config order.

    Labels removed from the config keep their index (their predictions are dropped at serving time).
    """
    merged = list(previous)
    known = set(merged)
    for label in labels:
        if label not in known:
            merged.append(label)
            known.add(label)
    return tuple(merged)


def class_index(class_names: Sequence[str]) -> dict[str, int]:
    """Label name → 0-based class index."""
    return {name: i for i, name in enumerate(class_names)}


def select_rectangles(
    result: Iterable[Mapping[str, Any]], config: LabelConfig, class_names: Sequence[str]
) -> Rectangles:
    """Keep the `rectanglelabels` items of `config.from_name` whose label is a known class.

    An item with several labels uses the first. Items of other controls are ignored silently (they are not
    boxes); items with an unknown label are counted in `unknown` (the caller logs them).
    """
    index = class_index(class_names)
    values: list[Mapping[str, Any]] = []
    labels: list[int] = []
    sizes: list[tuple[int, int] | None] = []
    unknown: Counter[str] = Counter()
    for item in result:
        if not isinstance(item, Mapping) or item.get("type") != "rectanglelabels":
            continue
        if item.get("from_name", config.from_name) != config.from_name:
            continue
        value = item.get("value")
        names = value.get("rectanglelabels") if isinstance(value, Mapping) else None
        if not isinstance(value, Mapping) or not names:
            unknown["<none>"] += 1
            continue
        name = str(names[0])
        if name not in index:
            unknown[name] += 1
            continue
        values.append(value)
        labels.append(index[name])
        width, height = item.get("original_width"), item.get("original_height")
        sizes.append((int(width), int(height)) if width and height else None)
    return Rectangles(tuple(values), tuple(labels), tuple(sizes), dict(unknown))


def log_unknown(unknown: Mapping[str, int], *, project: int, task: int | None = None) -> None:
    """One log line naming the unknown labels that were ignored, if any."""
    if unknown:
        where = f"project={project}" + (f" task={task}" if task is not None else "")
        names = ", ".join(f"{name}×{count}" for name, count in sorted(unknown.items()))
        log.warning("%s ignored boxes with labels not in the label config: %s", where, names)
