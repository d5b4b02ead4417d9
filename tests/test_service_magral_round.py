"""MAGRAL as a round's strategy: its record jobs against a toy proxy, the record specs checked against what
`fit_magral` draws, the real detector and proxy at toy size, the proxy cache shared by the record jobs, and a
round with each configured reward (`MAGRAL_REWARD`) whose one-off work the record jobs load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from service_fixtures import studio_with, toy_config, toy_steps

from magral_core.config import Config
from magral_core.method.policy import load_state
from magral_core.method.strategies import fit_magral
from magral_core.service import bindings, magral_round, stages
from magral_core.service import staging as files
from magral_core.service.bindings import HeuristicRound
from magral_core.service.magral_round import MagralRound
from magral_core.service.store import ModelStore

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_magral_record_specs_are_the_first_records_fit_magral_draws(tmp_path: Path) -> None:
    from magral_core.method.strategies import fit_magral

    config = toy_config(tmp_path, budget=3, lut_records=8, policy_episodes=2, seed=5)
    features = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    asked: list[tuple[tuple[int, ...], int]] = []

    def evaluate(indices: np.ndarray, seed: int) -> float:
        asked.append((tuple(int(i) for i in indices), int(seed)))
        return float(np.mean(indices)) / 12.0

    fit_magral(features, config.budget, evaluate, magral_round.magral_settings(config), seed=config.seed)
    specs = magral_round.magral_record_specs(12, config)
    assert len(specs) == MagralRound(config).records(12) == 4
    assert asked[: len(specs)] == [(spec.indices, spec.seed) for spec in specs]
    assert len(asked) == 8  # the other half is drawn near the policy, after the first fit


def test_magral_round_reuses_the_fanned_out_records_and_keeps_policy_and_table(tmp_path: Path) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []

    def toy_proxy(staging: Path, config: Config):
        def proxy(indices: np.ndarray, seed: int) -> float:
            calls.append((tuple(int(i) for i in indices), seed))
            return float(np.mean(indices)) / 10.0  # higher pool positions are "worth" more

        return proxy

    steps = replace(toy_steps(), strategy=lambda name, config: (
        MagralRound(config, proxy_factory=toy_proxy) if name == "magral" else HeuristicRound(name, config)))
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=range(3, 11))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=2, lut_records=6, policy_episodes=4)
    specs = magral_round.magral_record_specs(8, config)
    assert len(specs) == 3  # half of the records are random (fanned out), half near the policy
    version = stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 6  # every record was a "job"
    assert calls[:3] == [(spec.indices, spec.seed) for spec in specs]
    assert len(calls) == 6  # neither the first stage nor the fit computed a record itself
    directory = store.version_dir(1, version)
    assert (directory / files.POLICY_FILE).is_file() and (directory / files.LOOKUP_TABLE_FILE).is_file()
    assert not (directory / files.MAGRAL_FIT_FILE).exists()
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(3, 11))
    # the two stages with their records fanned out fit the same controller as one uninterrupted fit
    pool = magral_round._pool_of(files.load_pool(directory / files.POOL_FILE))
    settings = magral_round.magral_settings(config)
    whole, _ = fit_magral(pool.features, 2, toy_proxy(directory, config), settings, seed=config.seed)
    served = load_state(torch.load(directory / files.POLICY_FILE, weights_only=True))
    assert np.allclose(served.scores(pool.features, 2), whole.controller.scores(pool.features, 2))


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
    steps = bindings.default_steps()
    version = stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 2 and metrics["n_validation"] > 0
    directory = store.version_dir(1, version)
    table = json.loads((directory / files.LOOKUP_TABLE_FILE).read_text())
    # bookkeeping, not the value of a random detector: two records of `budget` distinct pool positions, with
    # a defined mAP (an undefined one raises)
    assert len(table["records"]) == 2
    for record in table["records"]:
        assert len(set(record["indices"])) == 2 and set(record["indices"]) <= set(range(5))
        assert np.isfinite(record["value"])
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(20, 25))


def test_build_proxy_computes_the_frozen_features_once_and_later_calls_load_them(
    bccd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from magral_core.datasets import load_dataset
    from magral_core.method.proxy import FrozenFeatures
    from magral_core.vision.detectors import build_detector

    data = load_dataset(bccd_root).split("train").subset(range(7))
    staging = tmp_path / "staging"
    staging.mkdir()
    files.save_images(
        staging / files.IMAGES_FILE,
        {"train": data.subset([0, 1, 2]), "val": data.subset([3]), "pool": data.subset([4, 5, 6])},
    )
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=64, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    meta = {"class_names": list(data.class_names)}
    bindings.save_model_step(model, staging / files.DETECTOR_FILE, meta)
    computed: list[int] = []
    compute = FrozenFeatures._compute

    def counted(self: FrozenFeatures, index: int) -> Any:
        computed.append(index)
        return compute(self, index)

    monkeypatch.setattr(FrozenFeatures, "_compute", counted)
    config = toy_config(tmp_path)
    MagralRound(config).prepare(staging)  # the prepare stage: every image, once
    assert len(computed) == 3 + 1 + 3 and (staging / files.PROXY_CACHE_FILE).is_file()
    first = magral_round.build_proxy(staging, config)
    second = magral_round.build_proxy(staging, config)
    assert len(computed) == 7  # the record jobs only loaded the cache
    value = first(np.array([0, 2]), 3)
    assert second(np.array([0, 2]), 3) == value and len(computed) == 7
    (staging / files.PROXY_CACHE_FILE).write_bytes(b"damaged")  # an unusable cache is recomputed, replaced
    assert magral_round.build_proxy(staging, config)(np.array([0, 2]), 3) == value and len(computed) == 14
    assert magral_round.build_proxy(staging, config)(np.array([0, 2]), 3) == value and len(computed) == 14


@pytest.mark.parametrize("reward", ["proxy", "pseudo_label", "retrospective"])
def test_magral_round_uses_the_configured_reward_and_shares_its_one_off_work(
    reward: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from magral_core.method import rewards

    made: list[str] = []
    events: list[str] = []
    make = rewards.make_reward

    def spy(name: str, round_: Any, **kwargs: Any) -> Any:
        made.append(name)
        built = make(name, round_, **kwargs)
        warm, load = built.warm, built.load
        built.warm = lambda *a: (events.append("warm"), warm(*a))[1]
        built.load = lambda *a: (events.append("load"), load(*a))[1]
        return built

    written: list[dict[str, Any]] = []
    write = files.write_lut_record
    monkeypatch.setattr(rewards, "make_reward", spy)
    monkeypatch.setattr(files, "write_lut_record",
                        lambda staging, index, record: (written.append(dict(record)),
                                                        write(staging, index, record))[1])
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=range(20, 25))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, image_size=64, epochs=1, batch_size=4, min_labeled_for_magral=12, budget=2,
                        lut_records=4, policy_episodes=2, reward=reward)
    assert config.reward == reward
    version = stages.run_round(1, client=studio, store=store, config=config, steps=bindings.default_steps())
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 4
    assert made and set(made) == {reward}  # every reward the round built is the configured one
    # the one-off work once (the prepare stage), every later build (the record jobs, the fit) loads it
    assert events[0] == "warm" and events.count("warm") == 1 and events.count("load") == len(made) - 1 >= 2
    assert len(written) == 4  # the record jobs: records of the real schema, with a finite value
    for record in written:
        files.check_record(record)
        assert set(record) == {"indices", "value", "source", "seed"} and np.isfinite(record["value"])
        assert len(set(record["indices"])) == 2 and set(record["indices"]) <= set(range(5))
    directory = store.version_dir(1, version)
    table = json.loads((directory / files.LOOKUP_TABLE_FILE).read_text())
    assert [r["value"] for r in table["records"]] == [r["value"] for r in written]
    assert not any((directory / name).exists() for name in files.UNPUBLISHED)
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(20, 25))


def test_a_reward_cache_reloaded_gives_the_values_computed(tmp_path: Path) -> None:
    # the retrospective reward's records and surrogate, saved by the prepare stage, load as computed
    from magral_core.method.rewards.retrospective import RetrospectiveReward

    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=range(20, 25))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, image_size=64, epochs=1, batch_size=4, min_labeled_for_magral=12, budget=2,
                        lut_records=2, policy_episodes=2, reward="retrospective")
    prepare = MagralRound.prepare

    def keep(self: MagralRound, staging: Path) -> None:
        prepare(self, staging)
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir()
        for name in (files.IMAGES_FILE, files.DETECTOR_FILE, files.POOL_FILE, files.LABELED_FILE,
                     files.REWARD_CACHE_FILE):
            (snapshot / name).write_bytes((staging / name).read_bytes())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MagralRound, "prepare", keep)
        stages.run_round(1, client=studio, store=store, config=config, steps=bindings.default_steps())
    snapshot = tmp_path / "snapshot"
    loaded = magral_round.build_reward(snapshot, config)
    assert isinstance(loaded, RetrospectiveReward) and loaded.records
    (snapshot / files.REWARD_CACHE_FILE).write_bytes(b"damaged")  # recomputed from scratch, replaced
    fresh = magral_round.build_reward(snapshot, config)
    assert isinstance(fresh, RetrospectiveReward)
    for batch in (np.array([0, 1]), np.array([2, 4]), np.array([3])):
        assert fresh(batch, 0) == pytest.approx(loaded(batch, 0), abs=1e-12)
    assert [r.value for r in fresh.records] == [r.value for r in loaded.records]
