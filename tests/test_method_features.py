"""Known answers for the per-image features and the feature cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magral_core.errors import DataError
from magral_core.method.features import (
    STAT_NAMES,
    FeatureCache,
    detection_stats,
    entropy,
    image_features,
    normalise,
    pool_features,
)
from magral_core.structures import Detections


def dets(scores, probs=None) -> Detections:
    k = len(scores)
    return Detections(
        np.zeros((k, 4), np.float32), np.asarray(scores, np.float32), np.zeros(k, np.int64),
        None if probs is None else np.asarray(probs, np.float32),
    )


def test_entropy_known_values() -> None:
    assert entropy(np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert entropy(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.0)
    assert entropy(np.array([0.2, 0.5, 0.3])) == pytest.approx(1.0296530, abs=1e-6)


def test_stats_with_class_probs() -> None:
    d = dets([0.9, 0.5], [[0.1, 0.9, 0.0], [0.5, 0.5, 0.0]])
    stats = dict(zip(STAT_NAMES, detection_stats(d, confident_threshold=0.6), strict=True))
    h1 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert stats["entropy_mean"] == pytest.approx((h1 + math.log(2)) / 2, abs=1e-6)
    assert stats["entropy_max"] == pytest.approx(math.log(2), abs=1e-6)
    assert stats["score_max"] == pytest.approx(0.9)
    assert stats["score_mean"] == pytest.approx(0.7)
    assert stats["confident"] == 1


def test_stats_without_class_probs_use_binary_entropy_of_the_top_k() -> None:
    d = dets([0.5, 0.99, 0.9])
    stats = detection_stats(d, top_k=2, confident_threshold=0.5)
    h = [-(s * math.log(s) + (1 - s) * math.log(1 - s)) for s in (0.99, 0.9)]  # 0.5 is not in the top 2
    assert stats[0] == pytest.approx(np.mean(h), abs=1e-6)
    assert stats[1] == pytest.approx(max(h), abs=1e-6)
    assert stats[4] == 3


def test_image_without_detections_has_zero_stats() -> None:
    assert detection_stats(Detections.empty(3)).tolist() == [0.0] * len(STAT_NAMES)
    assert image_features(np.ones(4), Detections.empty()).shape == (4 + len(STAT_NAMES),)


def test_pool_features_are_normalised_and_constant_columns_become_zero() -> None:
    emb = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    out = pool_features(emb, [dets([0.9]), dets([0.2, 0.3]), Detections.empty()])
    assert out.shape == (3, 2 + len(STAT_NAMES))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [-1.2247449, 0.0, 1.2247449], atol=1e-6)
    assert np.all(out[:, 1] == 0)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-6)
    with pytest.raises(ValueError, match="embeddings"):
        pool_features(emb, [dets([0.9])])
    with pytest.raises(ValueError, match="feature matrix"):
        normalise(np.zeros(3))


def test_feature_cache_round_trip(tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    assert cache.get(7, "v1") is None
    d = dets([0.9, 0.2], [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    cache.put(7, "v1", np.arange(3.0), d)
    cache.put(8, "v1", np.zeros(3), Detections.empty())
    emb, back = cache.get(7, "v1")  # type: ignore[misc]
    np.testing.assert_allclose(emb, [0, 1, 2])
    assert back.class_probs is not None and d.class_probs is not None
    np.testing.assert_allclose(back.class_probs, d.class_probs)
    np.testing.assert_allclose(back.scores, d.scores)
    _, empty = cache.get(8, "v1")  # type: ignore[misc]
    assert len(empty) == 0 and empty.class_probs is None
    assert cache.get(7, "v2") is None
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["7.npz", "8.npz"]  # no temporary files
    cache.path(9, "v1").write_bytes(b"not an npz")
    with pytest.raises(DataError, match=r"9\.npz"):
        cache.get(9, "v1")
