"""Warm starts copy every matching parameter and keep the grown class head fresh; warm trainings run
`warm_epochs` passes under the "epochs" schedule only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from magral_core.config import Config
from magral_core.vision.warm_start import warm_start, warm_training


def test_warm_start_keeps_everything_but_the_class_dependent_head(tmp_path: Path) -> None:

    from magral_core.vision.detectors import build_detector

    def detector(classes: int, seed: int) -> Any:
        return build_detector(
            "frcnn_mobilenet_v2",
            num_classes=classes,
            image_size=64,
            weights_dir=tmp_path,
            pretrained=False,
            seed=seed,
        )

    previous, grown = detector(2, seed=1), detector(3, seed=2)
    fresh = {k: v.clone() for k, v in grown.state_dict().items()}
    copied = warm_start(grown, previous)
    after, before = grown.state_dict(), previous.state_dict()
    changed_shape = [k for k in after if before[k].shape != after[k].shape]
    assert changed_shape and copied == len(after) - len(changed_shape)
    for key in changed_shape:  # the new head keeps its fresh initialisation
        assert torch.equal(after[key], fresh[key])
    same = next(k for k in after if k not in changed_shape and after[k].is_floating_point())
    assert torch.equal(after[same], before[same])



@pytest.mark.parametrize(("schedule", "warm_epochs", "epochs"), [("epochs", 0, 10), ("epochs", 3, 3),
                                                                  ("budget", 3, 10)])
def test_a_warm_training_runs_warm_epochs_only_under_the_epochs_schedule(
    schedule: str, warm_epochs: int, epochs: int
) -> None:
    config = Config(epochs=10, warm_epochs=warm_epochs, schedule=schedule)
    trained = warm_training(config)
    assert trained.epochs == epochs
    assert trained.replace(epochs=10) == config  # nothing else changes
