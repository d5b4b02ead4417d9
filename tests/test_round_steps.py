"""The real bindings of a round's steps: the detector at toy size (one torch thread), MAGRAL's record jobs
against a toy proxy, and the record specs checked against what `fit_magral` draws."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from service_fixtures import studio_with, toy_config, toy_steps

from magral_core import round_steps, rounds
from magral_core.config import Config
from magral_core.errors import DataError
from magral_core.policy import load_state
from magral_core.policy_training import TrainingSettings
from magral_core.store import ModelStore
from magral_core.strategies import MagralSettings, begin_fit, fit_magral

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_magral_record_specs_are_the_first_records_fit_magral_draws(tmp_path: Path) -> None:
    from magral_core.strategies import fit_magral

    config = toy_config(tmp_path, budget=3, lut_records=8, policy_episodes=2, seed=5)
    features = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    asked: list[tuple[tuple[int, ...], int]] = []

    def evaluate(indices: np.ndarray, seed: int) -> float:
        asked.append((tuple(int(i) for i in indices), int(seed)))
        return float(np.mean(indices)) / 12.0

    fit_magral(features, config.budget, evaluate, round_steps.magral_settings(config), seed=config.seed)
    specs = round_steps.magral_record_specs(12, config)
    assert len(specs) == round_steps.count_lut_records(12, config) == 4
    assert asked[: len(specs)] == [(spec.indices, spec.seed) for spec in specs]
    assert len(asked) == 8  # the other half is drawn near the policy, after the first fit


def test_round_with_the_real_detector_at_toy_size(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[4, 5])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, image_size=64, epochs=1, batch_size=2, prediction_threshold=0.0)
    steps = round_steps.default_steps()
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=steps)
    assert store.current_version(1) == version
    assert sorted(p["task"] for p in studio.imported) == [4, 5]
    assert sorted(p["score"] for p in studio.imported) == [0.0, 1.0]
    model = round_steps.load_model_step(store.version_dir(1, version) / rounds.DETECTOR_FILE)
    assert round_steps.warm_start(model, model) == len(model.state_dict())


def test_magral_round_reuses_the_fanned_out_records_and_keeps_policy_and_table(tmp_path: Path) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []

    def toy_proxy(staging: Path, config: Config):
        def proxy(indices: np.ndarray, seed: int) -> float:
            calls.append((tuple(int(i) for i in indices), seed))
            return float(np.mean(indices)) / 10.0  # higher pool positions are "worth" more

        return proxy

    steps = toy_steps()
    steps = rounds.RoundSteps(
        steps.train,
        steps.extract,
        steps.evaluate,
        steps.save_model,
        steps.load_model,
        round_steps.count_lut_records,
        lut_record=functools.partial(round_steps.lut_record_step, proxy_factory=toy_proxy),
        rank=functools.partial(round_steps.rank_step, proxy_factory=toy_proxy),
        propose_records=functools.partial(round_steps.propose_records_step, proxy_factory=toy_proxy),
    )
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=range(3, 11))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=2, lut_records=6, policy_episodes=4)
    specs = round_steps.magral_record_specs(8, config)
    assert len(specs) == 3  # half of the records are random (fanned out), half near the policy
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=steps)
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 6  # every record was a "job"
    assert calls[:3] == [(spec.indices, spec.seed) for spec in specs]
    assert len(calls) == 6  # neither the first stage nor the fit computed a record itself
    directory = store.version_dir(1, version)
    assert (directory / rounds.POLICY_FILE).is_file() and (directory / rounds.LOOKUP_TABLE_FILE).is_file()
    assert not (directory / rounds.MAGRAL_FIT_FILE).exists()
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(3, 11))
    # the two stages with their records fanned out fit the same controller as one uninterrupted fit
    pool = round_steps._pool_of(directory)
    whole, _ = fit_magral(pool.features, 2, toy_proxy(directory, config), round_steps.magral_settings(config),
                          seed=config.seed)
    served = load_state(torch.load(directory / rounds.POLICY_FILE, weights_only=True))
    assert np.allclose(served.scores(pool.features, 2), whole.controller.scores(pool.features, 2))


def test_magral_fit_saved_between_its_stages_round_trips(tmp_path: Path) -> None:
    features = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    settings = MagralSettings(records=6, training=TrainingSettings(updates=4, rollouts=2))

    def proxy(indices: np.ndarray, seed: int) -> float:
        return float(np.sum(indices)) / 100.0

    fit = begin_fit(features, 3, proxy, settings, seed=1)
    round_steps.save_fit(tmp_path / "fit.pt", fit)
    loaded = round_steps.load_fit(tmp_path / "fit.pt")
    assert loaded.pending == fit.pending and len(fit.pending) == 3
    assert loaded.rng.bit_generator.state == fit.rng.bit_generator.state
    assert [r.value for r in loaded.report.records] == [r.value for r in fit.report.records]
    assert loaded.report.estimator == fit.report.estimator
    assert np.allclose(loaded.controller.scores(features, 3), fit.controller.scores(features, 3))
    (tmp_path / "bad.pt").write_bytes(b"not a fit")
    with pytest.raises(DataError, match=r"bad\.pt"):
        round_steps.load_fit(tmp_path / "bad.pt")


def test_warm_start_keeps_everything_but_the_class_dependent_head(tmp_path: Path) -> None:
    import torch

    from magral_core.detectors import build_detector

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
    copied = round_steps.warm_start(grown, previous)
    after, before = grown.state_dict(), previous.state_dict()
    changed_shape = [k for k in after if before[k].shape != after[k].shape]
    assert changed_shape and copied == len(after) - len(changed_shape)
    for key in changed_shape:  # the new head keeps its fresh initialisation
        assert torch.equal(after[key], fresh[key])
    same = next(k for k in after if k not in changed_shape and after[k].is_floating_point())
    assert torch.equal(after[same], before[same])


def test_magral_round_with_the_real_detector_and_proxy_at_toy_size(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=range(20, 25))
    store = ModelStore(tmp_path / "store")
    config = toy_config(
        tmp_path,
        image_size=64,
        epochs=1,
        batch_size=4,
        min_labeled_for_magral=12,
        budget=2,
        lut_records=2,
        policy_episodes=2,
    )
    steps = round_steps.default_steps()
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=steps)
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 2 and metrics["n_validation"] > 0
    directory = store.version_dir(1, version)
    table = json.loads((directory / rounds.LOOKUP_TABLE_FILE).read_text())
    assert len(table["records"]) == 2 and all(0.0 <= r["value"] <= 1.0 for r in table["records"])
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(20, 25))


def test_build_proxy_computes_the_frozen_features_once_and_later_calls_load_them(
    bccd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from magral_core.datasets import load_dataset
    from magral_core.detectors import build_detector
    from magral_core.proxy import FrozenFeatures

    data = load_dataset(bccd_root).split("train").subset(range(7))
    staging = tmp_path / "staging"
    staging.mkdir()
    rounds.save_images(
        staging / rounds.IMAGES_FILE,
        {"train": data.subset([0, 1, 2]), "val": data.subset([3]), "pool": data.subset([4, 5, 6])},
    )
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=64, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    meta = {"class_names": list(data.class_names)}
    round_steps.save_model_step(model, staging / rounds.DETECTOR_FILE, meta)
    computed: list[int] = []
    compute = FrozenFeatures._compute

    def counted(self: FrozenFeatures, index: int) -> Any:
        computed.append(index)
        return compute(self, index)

    monkeypatch.setattr(FrozenFeatures, "_compute", counted)
    config = toy_config(tmp_path)
    round_steps.prepare_proxy_step(staging, config)  # the prepare stage: every image, once
    assert len(computed) == 3 + 1 + 3 and (staging / rounds.PROXY_CACHE_FILE).is_file()
    first = round_steps.build_proxy(staging, config)
    second = round_steps.build_proxy(staging, config)
    assert len(computed) == 7  # the record jobs only loaded the cache
    value = first(np.array([0, 2]), 3)
    assert second(np.array([0, 2]), 3) == value and len(computed) == 7
    (staging / rounds.PROXY_CACHE_FILE).write_bytes(b"damaged")  # an unusable cache is recomputed, replaced
    assert round_steps.build_proxy(staging, config)(np.array([0, 2]), 3) == value and len(computed) == 14
    assert round_steps.build_proxy(staging, config)(np.array([0, 2]), 3) == value and len(computed) == 14
