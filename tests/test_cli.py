"""The `magral` entry: sub-commands load lazily, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from magral_core.cli import COMMANDS, build_parser, main


def test_serve_parser_loads_no_torch() -> None:
    code = (
        "import sys; from magral_core.cli import build_parser; build_parser('serve'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_every_command() -> None:
    text = build_parser(None).format_help()
    for name in COMMANDS:
        assert name in text


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
