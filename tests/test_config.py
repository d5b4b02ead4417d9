"""Config: parsing, validation, and the README listing every variable."""

from __future__ import annotations

import ast
import inspect
import itertools
import re
from dataclasses import fields
from pathlib import Path

import pytest

from magral_core.config import Config, ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_without_environment() -> None:
    config = Config.from_env({})
    assert config.redis_url == ""
    assert config.seed == 0
    assert config.weights_dir == config.torch_home / "hub" / "checkpoints"


def test_values_are_parsed_by_type() -> None:
    config = Config.from_env(
        {"MAGRAL_SEED": "7", "MAGRAL_SCORE_THRESHOLD": "0.25", "MAGRAL_HOME": "/tmp/x", "REDIS_URL": "redis://h"}
    )
    assert (config.seed, config.score_threshold, config.home, config.redis_url) == (
        7, 0.25, Path("/tmp/x"), "redis://h"
    )


def test_overrides_win_over_environment() -> None:
    assert Config.from_env({"MAGRAL_SEED": "7"}, seed=3).seed == 3


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MAGRAL_EPOCHS must be int, found 'ten'"):
        Config.from_env({"MAGRAL_EPOCHS": "ten"})


@pytest.mark.parametrize(
    ("env", "message"),
    [({"MAGRAL_BUDGET": "0"}, "budget must be > 0"), ({"MAGRAL_DEVICE": "tpu"}, "MAGRAL_DEVICE must be"),
     ({"MAGRAL_CANDIDATE_FACTOR": "0"}, "MAGRAL_CANDIDATE_FACTOR must be >= 1, found 0"),
     ({"MAGRAL_CANDIDATES_ABOVE": "-1"}, "MAGRAL_CANDIDATES_ABOVE must be >= 0, found -1")],
)
def test_out_of_range_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_config_is_frozen() -> None:
    config = Config.from_env({})
    with pytest.raises(AttributeError):
        config.seed = 1  # type: ignore[misc]


def test_thread_count_follows_processes() -> None:
    assert Config.from_env({}, threads=3).torch_threads == 3
    assert Config.from_env({}, processes_per_machine=1000).torch_threads == 1


def _field_docs() -> dict[str, str]:
    """Config's attribute docstrings by field name, whitespace collapsed."""
    tree = ast.parse(inspect.getsource(Config))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in itertools.pairwise(body)
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)
    }


def test_readme_lists_every_environment_variable_as_the_code_documents_it() -> None:
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| (.*) \|$", README.read_text(), re.MULTILINE))
    docs = _field_docs()
    assert len(docs) == len(fields(Config))
    wrong = {f.metadata["env"]: (rows.get(f.metadata["env"]), docs[f.name]) for f in fields(Config)
             if rows.get(f.metadata["env"]) != docs[f.name]}
    assert not wrong, f"README rows (found, expected) differ from the code: {wrong}"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MAGRAL_FALLBACK_STRATEGY", "entropy_mx"), ("MAGRAL_FALLBACK_STRATEGY", "magral"),
     ("MAGRAL_DETECTOR", "yolo"), ("MAGRAL_LOG_LEVEL", "LOUD"), ("MAGRAL_DEVICE", "tpu")],
)
def test_enumerated_fields_are_checked_when_read(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({variable: value})
    message = str(raised.value)
    assert variable in message and repr(value) in message and "must be" in message


def test_the_registries_answer_to_the_names_the_config_allows() -> None:
    from magral_core.config import DETECTOR_NAMES, HEURISTIC_STRATEGIES, STRATEGY_NAMES
    from magral_core.method.strategies import STRATEGIES, make_strategy
    from magral_core.method.strategies.uncertainty import AGGREGATIONS, MEASURES
    from magral_core.vision.detectors import DETECTORS

    assert set(DETECTORS) == set(DETECTOR_NAMES)
    assert STRATEGIES == STRATEGY_NAMES and set(STRATEGY_NAMES) - set(HEURISTIC_STRATEGIES) == {"magral"}
    assert {f"{m}_{a}" for m in MEASURES for a in AGGREGATIONS} <= set(HEURISTIC_STRATEGIES)
    for name in HEURISTIC_STRATEGIES:
        assert make_strategy(name) is not None


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_wrong_name_stops_serve_and_worker_at_start_up_with_one_line(
    command: str, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from magral_core.cli import main

    monkeypatch.setenv("MAGRAL_HOME", str(tmp_path))
    monkeypatch.setenv("MAGRAL_FALLBACK_STRATEGY", "entropy_mx")
    assert main([command]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MAGRAL_FALLBACK_STRATEGY" in lines[0] and "'entropy_mx'" in lines[0]
    monkeypatch.setenv("MAGRAL_FALLBACK_STRATEGY", "coreset")
    monkeypatch.setenv("MAGRAL_DETECTOR", "frcnn_mobilenet")
    assert main([command]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MAGRAL_DETECTOR" in lines[0] and "frcnn_mobilenet_v2" in lines[0]


def test_unknown_reward_names_the_variable_the_value_and_the_choices() -> None:
    assert Config.from_env({"MAGRAL_REWARD": "retrospective"}).reward == "retrospective"
    with pytest.raises(ConfigError, match=r"MAGRAL_REWARD must be one of proxy, pseudo_label, "
                                          r"retrospective; found 'oracle'"):
        Config.from_env({"MAGRAL_REWARD": "oracle"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MAGRAL_STUDIO_ATTEMPTS", "0"), ("MAGRAL_STUDIO_BACKOFF", "-1"), ("MAGRAL_STUDIO_MAX_BACKOFF", "601"),
     ("MAGRAL_KEEP_PREDICTION_VERSIONS", "-1"), ("MAGRAL_PREDICTION_CHUNK", "0")],
)
def test_label_studio_call_settings_are_checked(variable: str, value: str) -> None:
    with pytest.raises(ConfigError):
        Config.from_env({variable: value})
    with pytest.raises(ConfigError, match="MAGRAL_STUDIO_BACKOFF"):
        Config.from_env({"MAGRAL_STUDIO_BACKOFF": "10", "MAGRAL_STUDIO_MAX_BACKOFF": "5"})
    assert Config().allowed_image_hosts == "none" and Config().keep_prediction_versions == 1
