"""The model store: unique sortable versions, atomic publish, CURRENT written last, errors kept."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from magral_core.errors import UserError
from magral_core.service.store import ModelStore, StoreError, version_name, version_number, write_json


def publish(store: ModelStore, project: int, **files: object) -> str:
    version = store.reserve_version(project)
    staging = store.begin(project, version)
    for name, data in files.items():
        write_json(staging / f"{name}.json", data)
    store.publish(project, staging, version)
    return version


def test_version_names_sort_and_parse() -> None:
    assert version_name(3, 7) == "magral-3-v0007" and version_number("magral-3-v0007") == 7
    assert sorted([version_name(1, 10), version_name(1, 9)]) == ["magral-1-v0009", "magral-1-v0010"]
    with pytest.raises(StoreError, match="expected a version name"):
        version_number("v3")


def test_empty_project(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.current_version(4) is None and store.list_versions(4) == [] and store.last_error(4) is None
    assert store.projects() == []
    with pytest.raises(StoreError, match="no published version"):
        store.version_dir(4, "magral-4-v0001")


def test_reserved_names_are_unique_even_when_never_published(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    names = [store.reserve_version(1) for _ in range(3)]
    assert names == ["magral-1-v0001", "magral-1-v0002", "magral-1-v0003"]
    assert publish(store, 1) == "magral-1-v0004"
    assert store.reserve_version(2) == "magral-2-v0001"


def test_publish_moves_staging_and_points_current_at_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = publish(
        store,
        1,
        metrics={"map": 0.1, "class_names": ["a"]},
        ranking={"strategy": "random", "task_ids": [5, 3], "scores": [0.0, 1.0]},
    )
    assert (tmp_path / "1" / "CURRENT").read_text() == first + "\n"
    assert store.load_metrics(1, first)["map"] == 0.1
    ranking = store.load_ranking(1, first)
    assert ranking.task_ids == (5, 3) and ranking.score_of() == {5: 0.0, 3: 1.0}
    second = publish(store, 1, metrics={"map": 0.2})
    assert store.current_version(1) == second and store.list_versions(1) == [first, second]
    assert not list((tmp_path / "1" / "staging").iterdir())
    assert store.projects() == [1]


def test_a_version_is_never_overwritten(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    version = publish(store, 1)
    staging = store.begin(1, version)
    with pytest.raises(StoreError, match="already published"):
        store.publish(1, staging, version)
    assert store.current_version(1) == version


def test_an_abandoned_staging_dir_changes_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    served = publish(store, 1)
    staging = store.begin(1, store.reserve_version(1))
    (staging / "detector.pt").write_bytes(b"half written")
    store.record_error(1, "RuntimeError: killed", stage="round")
    assert store.current_version(1) == served and store.list_versions(1) == [served]
    error = store.last_error(1)
    assert error is not None and error["stage"] == "round" and error["message"] == "RuntimeError: killed"
    store.discard(staging)
    assert not staging.exists()
    publish(store, 1)
    assert store.last_error(1) is None  # a successful publish clears it


def test_corrupt_files_raise_store_errors_naming_the_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    version = publish(store, 1, metrics=[1, 2])
    with pytest.raises(StoreError, match="expected an object"):
        store.load_metrics(1, version)
    (store.version_dir(1, version) / "ranking.json").write_text("{oops")
    with pytest.raises(StoreError, match=r"ranking\.json"):
        store.load_ranking(1, version)


def test_project_ids_must_be_integers(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="project id"):
        ModelStore(tmp_path).project_dir("../etc")  # type: ignore[arg-type]


def test_connection_details_are_private_and_label_config_kept(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.load_connection(1) == {} and store.load_label_config(1) is None
    store.save_connection(1, {"hostname": "http://ls:8080", "access_token": "t"})
    path = tmp_path / "1" / "connection.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == {"access_token": "t", "hostname": "http://ls:8080"}
    store.save_label_config(1, "<View/>")
    assert store.load_label_config(1) == "<View/>"
