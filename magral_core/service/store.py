"""The model store: per project, immutable versions on disk and a one-line pointer to the one being served.

Layout under `root` (the config's `home / "projects"`)::

    <project>/CURRENT                      one line: the served version name (written last, atomically)
    <project>/versions/<version>/          published versions, never modified after the rename
        detector.pt  policy.pt  lookup_table.json  ranking.json  metrics.json  ...
    <project>/staging/<version>.<random>/  a round being built; renamed into versions/ when complete
    <project>/reserved/<version>           names handed out (mkdir is atomic, so names are unique)
    <project>/announced/<NNNN>.json        which steps of telling Label Studio of a version are done
    <project>/last_error.json              the last failed round (cleared by the next publish)
    <project>/setup_error.json             the last refused /setup (cleared by the next accepted one)
    <project>/connection.json              Label Studio hostname/token seen in /setup (mode 0600)
    <project>/label_config.xml             the label config seen in /setup

A version name is `magral-<project>-v<NNNN>`: sortable and unique per project. A failed or killed round
leaves only a staging directory and an error record; the served version does not change.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magral_core.atomic import read_json, write_json, write_text_atomic
from magral_core.errors import StoreError, UserError
from magral_core.service import staging as files

VERSION_RE = re.compile(r"^magral-(\d+)-v(\d{4,})$")


def version_name(project: int, number: int) -> str:
    """`magral-<project>-v<number, 4 digits or more>`."""
    return f"magral-{project}-v{number:04d}"


def version_number(name: str) -> int:
    """The number of a version name; raises StoreError for a name that is not one."""
    match = VERSION_RE.match(name)
    if not match:
        raise StoreError(f"expected a version name like 'magral-2-v0003', found {name!r}")
    return int(match.group(2))


@dataclass(frozen=True)
class Ranking:
    """A version's ranking of the unlabeled pool: `task_ids` best first, with LS `scores` (best lowest)."""

    version: str
    strategy: str
    task_ids: tuple[int, ...]
    scores: tuple[float, ...]

    def score_of(self) -> dict[int, float]:
        return dict(zip(self.task_ids, self.scores, strict=True))


class ModelStore:
    """Versioned model directories per project under `root`. Safe across processes on one file system."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- paths -------------------------------------------------------------------------------------------
    def project_dir(self, project: int) -> Path:
        if not isinstance(project, int) or isinstance(project, bool) or project < 0:
            raise UserError(f"expected a project id (non-negative integer), found {project!r}")
        return self.root / str(project)

    def version_dir(self, project: int, version: str) -> Path:
        """Directory of a published version; raises StoreError when it does not exist."""
        version_number(version)
        path = self.project_dir(project) / "versions" / version
        if not path.is_dir():
            raise StoreError(f"project {project} has no published version {version!r}")
        return path

    # --- versions ------------------------------------------------------------------------------------------
    def current_version(self, project: int) -> str | None:
        """The served version, or None before the first publish."""
        pointer = self.project_dir(project) / "CURRENT"
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def list_versions(self, project: int) -> list[str]:
        """Published version names, oldest first."""
        versions = self.project_dir(project) / "versions"
        if not versions.is_dir():
            return []
        names = [p.name for p in versions.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(names, key=version_number)

    def reserve_version(self, project: int) -> str:
        """A fresh version name, greater than every published or reserved one (atomic mkdir)."""
        reserved = self.project_dir(project) / "reserved"
        reserved.mkdir(parents=True, exist_ok=True)
        taken = [version_number(p.name) for p in reserved.iterdir() if VERSION_RE.match(p.name)]
        taken += [version_number(n) for n in self.list_versions(project)]
        number = max(taken, default=0) + 1
        while True:
            name = version_name(project, number)
            try:
                (reserved / name).mkdir()
                return name
            except FileExistsError:
                number += 1

    def begin(self, project: int, version: str) -> Path:
        """A new empty staging directory for `version` inside the project directory."""
        version_number(version)
        staging = self.project_dir(project) / "staging" / f"{version}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        return staging

    def publish(self, project: int, staging: Path, version: str) -> Path:
        """Rename a complete staging directory to `versions/<version>` (atomic), then point CURRENT there.

        Raises StoreError when the version already exists. Clears the project's last error.
        """
        target = self.project_dir(project) / "versions" / version
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise StoreError(f"project {project}: version {version} is already published")
        os.rename(staging, target)
        write_text_atomic(self.project_dir(project) / "CURRENT", version + "\n")
        (self.project_dir(project) / "last_error.json").unlink(missing_ok=True)
        return target

    def discard(self, staging: Path) -> None:
        """Remove a staging directory (a failed round)."""
        shutil.rmtree(staging, ignore_errors=True)

    def abandon(self, project: int, version: str) -> None:
        """Remove every staging directory of `version` and its reservation (a round that died unpublished;
        its number may be handed out again). A published `version` keeps its directory."""
        version_number(version)
        for staging in (self.project_dir(project) / "staging").glob(f"{version}.*"):
            shutil.rmtree(staging, ignore_errors=True)
        self.release(project, version)

    def release(self, project: int, version: str) -> None:
        """Drop the reservation of `version` (published or abandoned: `versions/` keeps published numbers)."""
        version_number(version)
        shutil.rmtree(self.project_dir(project) / "reserved" / version, ignore_errors=True)

    # --- artefacts -----------------------------------------------------------------------------------------
    def load_ranking(self, project: int, version: str) -> Ranking:
        data = files.load_ranking(self.version_dir(project, version))
        return Ranking(
            version,
            str(data.get("strategy", "")),
            tuple(int(t) for t in data["task_ids"]),
            tuple(float(s) for s in data["scores"]),
        )

    def load_metrics(self, project: int, version: str) -> dict[str, Any]:
        data = files.load_metrics(self.version_dir(project, version))
        if not isinstance(data, dict):
            raise StoreError(
                f"expected an object in {files.METRICS_FILE} of {version}, found {type(data).__name__}"
            )
        return data

    # --- errors and connection details ------------------------------------------------------------------
    def _announced(self, project: int, version: str) -> Path:
        return self.project_dir(project) / "announced" / f"{version_number(version):04d}.json"

    def load_announced(self, project: int, version: str) -> dict[str, Any]:
        """Which steps of telling Label Studio of the published `version` are done ({} before any)."""
        path = self._announced(project, version)
        data = read_json(path) if path.is_file() else {}
        return data if isinstance(data, dict) else {}

    def save_announced(self, project: int, version: str, done: Mapping[str, Any]) -> None:
        """`{"predictions": bool, "sampling": bool, "pruned": bool, "time": float}` of a published version,
        kept beside it (`<project>/announced/`) so that the version itself is never modified."""
        write_json(self._announced(project, version), dict(done))

    def record_error(self, project: int, message: str, *, stage: str) -> None:
        """Keep the last error of a round (`stage` "round") or a setup ("setup") for `/status`; each source
        has its own record, so a refused setup never hides a failed round."""
        record = {"stage": stage, "message": str(message)[:2000], "time": time.time()}
        write_json(self._error_path(project, stage), record)

    def clear_error(self, project: int, *, stage: str) -> None:
        self._error_path(project, stage).unlink(missing_ok=True)

    def errors(self, project: int) -> dict[str, dict[str, Any]]:
        """The recorded error of each source ("round", "setup") that has one."""
        out = {}
        for stage in ("round", "setup"):
            path = self._error_path(project, stage)
            data = read_json(path) if path.is_file() else None
            if isinstance(data, dict):
                out[stage] = data
        return out

    def last_error(self, project: int) -> dict[str, Any] | None:
        """The latest of the recorded errors, or None."""
        recorded = self.errors(project).values()
        return max(recorded, key=lambda e: float(e.get("time", 0.0)), default=None)

    def _error_path(self, project: int, stage: str) -> Path:
        return self.project_dir(project) / ("setup_error.json" if stage == "setup" else "last_error.json")

    def save_connection(self, project: int, details: Mapping[str, str]) -> None:
        """Label Studio hostname/access token from `/setup`, readable by the owner only."""
        write_json(self.project_dir(project) / "connection.json", dict(details), permissions=0o600)

    def load_connection(self, project: int) -> dict[str, str]:
        path = self.project_dir(project) / "connection.json"
        if not path.is_file():
            return {}
        data = read_json(path)
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def save_label_config(self, project: int, xml: str) -> None:
        """The label config last seen in `/setup` (used when `/predict` carries none)."""
        write_text_atomic(self.project_dir(project) / "label_config.xml", xml)

    def load_label_config(self, project: int) -> str | None:
        path = self.project_dir(project) / "label_config.xml"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def projects(self) -> list[int]:
        """Project ids that have a directory in the store."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())
