"""Warm starts: a detector that continues from a previously trained one, and the training it gets then.

A round's detector is built fresh (ImageNet trunk, seeded heads) and takes every parameter of the previous
round's detector whose name and shape match, so only class-dependent layers that grew with the label list
keep their fresh initialisation. The service's rounds (`service.bindings`) and the simulator's warm curves
(`simulation.detector`) both start this way; a warm-started training under the "epochs" schedule runs
`Config.warm_epochs` passes when that is set.
"""

from __future__ import annotations

import logging
from typing import Any

from magral_core.config import Config

log = logging.getLogger(__name__)


def warm_start(model: Any, previous: Any) -> int:
    """Copy every parameter of `previous` whose name and shape match into `model`; returns how many."""
    import torch

    target = model.state_dict()
    source = {k: v for k, v in previous.state_dict().items() if k in target and v.shape == target[k].shape}
    with torch.no_grad():
        model.load_state_dict(source, strict=False)
    log.info("warm start: %d of %d tensors taken from the previous version", len(source), len(target))
    return len(source)


def warm_training(config: Config) -> Config:
    """The configuration a warm-started training runs with: `warm_epochs` passes under the "epochs" schedule
    when set, otherwise `config` itself."""
    if config.schedule == "epochs" and config.warm_epochs > 0:
        return config.replace(epochs=config.warm_epochs)
    return config
