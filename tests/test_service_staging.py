"""The round's files: the pool's scoring chunks (their bounds, their files, the merge into the pool file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from magral_core.errors import StoreError
from magral_core.service import staging as files
from magral_core.structures import Detections


def detections_of(image: int) -> Detections:
    """Image `image` has `image % 3` boxes (none for every third image), each naming the image."""
    n = image % 3
    boxes = np.tile(np.array([[image, 1, image + 5, 9]], np.float32), (n, 1))
    return Detections(boxes, np.full(n, 0.5, np.float32), np.zeros(n, np.int64),
                      np.full((n, 3), 1 / 3, np.float32))


def write_chunks(staging: Path, bounds: list[tuple[int, int]], order: list[int] | None = None) -> None:
    """Chunk files of `bounds` (written in `order`, as parallel jobs end); image i has embedding (i, -i)."""
    for index in order if order is not None else range(len(bounds)):
        start, stop = bounds[index]
        files.write_pool_chunk(staging, index, [detections_of(i) for i in range(start, stop)],
                               np.array([[i, -i] for i in range(start, stop)], np.float32).reshape(-1, 2))


@pytest.mark.parametrize(
    ("size", "chunk", "bounds"),
    [(0, 3, []), (1, 3, [(0, 1)]), (3, 3, [(0, 3)]), (4, 3, [(0, 3), (3, 4)]),
     (7, 2, [(0, 2), (2, 4), (4, 6), (6, 7)]), (5, 1, [(i, i + 1) for i in range(5)])],
)
def test_chunk_bounds_cover_the_pool_in_order(size: int, chunk: int, bounds: list[tuple[int, int]]) -> None:
    assert files.chunk_bounds(size, chunk) == bounds


def test_chunk_bounds_refuse_an_empty_chunk() -> None:
    with pytest.raises(ValueError, match="at least 1 image, found 0"):
        files.chunk_bounds(5, 0)


def test_chunks_written_in_any_order_merge_in_pool_order(tmp_path: Path) -> None:
    bounds = files.chunk_bounds(7, 3)
    write_chunks(tmp_path, bounds, order=[2, 0, 1])
    labeled = np.array([[9.0, 9.0]], np.float32)
    path = files.merge_pool_chunks(tmp_path, bounds, labeled)
    pool = files.load_pool(path)
    assert pool["embeddings"][:, 0].tolist() == list(range(7))
    assert [len(d) for d in pool["detections"]] == [i % 3 for i in range(7)]
    assert all(d.boxes_xyxy[:, 0].tolist() == [i] * (i % 3) for i, d in enumerate(pool["detections"]))
    assert pool["detections"][1].class_probs is not None
    np.testing.assert_array_equal(pool["labeled_embeddings"], labeled)
    assert not (tmp_path / files.SCORES_DIR).exists()  # the chunks are gone once merged


def test_a_missing_chunk_is_named_and_no_pool_file_is_written(tmp_path: Path) -> None:
    bounds = files.chunk_bounds(7, 3)
    write_chunks(tmp_path, bounds, order=[0, 2])
    with pytest.raises(StoreError, match=r"scoring chunk 1 \(pool images 3-5\).*its job failed"):
        files.merge_pool_chunks(tmp_path, bounds, np.zeros((0, 2)))
    assert not (tmp_path / files.POOL_FILE).exists()
    assert files.chunk_path(tmp_path, 0).is_file()  # nothing merged, nothing deleted


def test_a_chunk_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    write_chunks(tmp_path, [(0, 2)])
    with pytest.raises(StoreError, match="expected 3 images in scoring chunk 0"):
        files.merge_pool_chunks(tmp_path, [(0, 3)], np.zeros((0, 2)))
