"""The configured torch device (`MAGRAL_DEVICE`) reaches every torch stage of a round: training, scoring,
evaluation, the rewards' feature caching and the look-up-table records. On a machine with CUDA a round at
toy size runs there; everywhere, a device name is checked when the config is read and where torch runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from service_fixtures import studio_with, toy_config

from magral_core.config import Config, ConfigError
from magral_core.method.proxy import FrozenFeatures
from magral_core.service import bindings, magral_round, stages
from magral_core.service import staging as files
from magral_core.service.store import ModelStore
from magral_core.structures import AnnotatedImage, DetectionDataset
from magral_core.vision.checkpoint import read_checkpoint
from magral_core.vision.detectors import build_detector
from magral_core.vision.engine import torch_device

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False: no CUDA device here")
needs_no_cuda = pytest.mark.skipif(CUDA, reason="a CUDA device exists here: a 'cuda' config is valid")


# --- everywhere: names checked ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpu", "tpu", "CPU", "cuda:", "cuda:x", "cuda:-1", " cpu", "mps"])
def test_a_device_name_torch_cannot_take_is_refused_when_the_config_is_read(name: str) -> None:
    expected = rf"MAGRAL_DEVICE must be 'cpu', 'cuda' or 'cuda:<index>'; found '{name}'"
    with pytest.raises(ConfigError, match=expected):
        Config.from_env({"MAGRAL_DEVICE": name})


def test_cpu_and_cuda_names_are_read_as_given() -> None:
    # whether this machine has them is checked where torch runs
    for name in ("cpu", "cuda", "cuda:0", "cuda:3"):
        assert Config.from_env({"MAGRAL_DEVICE": name}).device == name
    assert torch_device("cpu") == torch.device("cpu")


@needs_no_cuda
def test_cuda_without_a_cuda_device_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"MAGRAL_DEVICE is 'cuda:1' but torch sees 0 CUDA device"):
        torch_device("cuda:1")


# --- everywhere: the device reaches every stage ----------------------------------------------------------
def tiny_sets(root: Path) -> dict[str, DetectionDataset]:
    """Train (3), validation (1) and pool (2) sets of 64x48 noise images, one box per labeled image."""
    images = []
    for i in range(6):
        path = root / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        boxes = np.array([[8, 8, 40, 36]], np.float32) if i < 4 else np.zeros((0, 4), np.float32)
        images.append(AnnotatedImage(i, str(path), 64, 48, boxes, np.zeros(len(boxes), np.int64)))
    whole = DetectionDataset(root, ("RBC",), tuple(images))
    return {"train": whole.subset([0, 1, 2]), "val": whole.subset([3]), "pool": whole.subset([4, 5])}


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[tuple[Path, dict[str, DetectionDataset]]]:
    """A staging directory with the image sets and a detector, as the prepare stage leaves it."""
    sets = tiny_sets(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    files.save_images(staging / files.IMAGES_FILE, dict(sets))
    model = build_detector("frcnn_mobilenet_v2", num_classes=1, image_size=64, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    bindings.save_model_step(model, staging / files.DETECTOR_FILE, {"class_names": ["RBC"]})
    yield staging, sets


def test_the_configured_cpu_is_where_training_scoring_and_records_run(
    tmp_path: Path, staged: tuple[Path, dict[str, DetectionDataset]]
) -> None:
    staging, sets = staged
    config = toy_config(tmp_path, device="cpu", image_size=64, epochs=1, batch_size=2)
    model = bindings.train_detector_step(sets["train"], None, config, lambda stage, fraction: None)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    detections, embeddings = bindings.extract_step(model, sets["pool"], config)
    assert len(detections) == 2 and embeddings.shape[0] == 2
    reward = magral_round.build_reward(staging, config, "proxy")
    assert np.isfinite(reward(np.array([0]), 0))


@needs_no_cuda
def test_a_cuda_config_reaches_training_scoring_and_the_rewards(
    tmp_path: Path, staged: tuple[Path, dict[str, DetectionDataset]]
) -> None:
    # on a machine without CUDA each stage refuses the 'cuda' config instead of quietly using the CPU
    staging, sets = staged
    config = toy_config(tmp_path, device="cuda", image_size=64, epochs=1, batch_size=2)
    with pytest.raises(ConfigError, match="MAGRAL_DEVICE is 'cuda'"):
        bindings.train_detector_step(sets["train"], None, config, lambda stage, fraction: None)
    model = bindings.load_model_step(staging / files.DETECTOR_FILE)
    with pytest.raises(ConfigError, match="MAGRAL_DEVICE is 'cuda'"):
        bindings.extract_step(model, sets["pool"], config)
    for reward in ("proxy", "pseudo_label"):
        with pytest.raises(ConfigError, match="MAGRAL_DEVICE is 'cuda'"):
            magral_round.build_reward(staging, config, reward)


# --- on CUDA: a round at toy size ------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("reward", ["proxy", "pseudo_label", "retrospective"])
def test_a_round_on_cuda_trains_scores_evaluates_and_computes_records_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reward: str
) -> None:
    seen: dict[str, set[str]] = {"train": set(), "extract": set(), "features": set()}
    real = bindings.default_steps()

    def train(*args: Any) -> Any:
        model = real.train(*args)
        seen["train"].update(p.device.type for p in model.parameters())
        return model

    def extract(model: Any, dataset: Any, config: Any) -> Any:
        out = real.extract(model, dataset, config)
        seen["extract"].update(p.device.type for p in model.parameters())
        return out

    compute = FrozenFeatures._compute

    def features(self: FrozenFeatures, index: int) -> Any:
        seen["features"].add(self.device.type)
        return compute(self, index)

    monkeypatch.setattr(FrozenFeatures, "_compute", features)
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=range(20, 25))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, device="cuda", image_size=64, epochs=1, batch_size=2, scoring_chunk=2,
                        min_labeled_for_magral=12, budget=2, lut_records=2, policy_episodes=2, reward=reward)
    steps = replace(real, train=train, extract=extract)
    version = stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    assert seen == {"train": {"cuda"}, "extract": {"cuda"}, "features": {"cuda"}}
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["n_validation"] > 0 and metrics["map"] is not None
    assert metrics["lut_records"] >= 2
    directory = store.version_dir(1, version)
    pool = files.load_pool(directory / files.POOL_FILE)  # scored in 3 chunks on the GPU, merged in order
    assert len(pool["detections"]) == 5 and np.isfinite(pool["embeddings"]).all()
    state = read_checkpoint(directory / files.DETECTOR_FILE)["state_dict"]
    assert {t.device.type for t in state.values()} == {"cpu"}  # the checkpoint loads anywhere
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(20, 25))
