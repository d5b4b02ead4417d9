"""The `magral` command: one sub-module per sub-command, each with `register(subparsers)`.

Every handler receives the parsed arguments and the process's `Config`; a `UserError` (bad path, malformed
file) prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from magral_core.config import Config, ConfigError
from magral_core.errors import UserError

# Sub-command → module. Only the module of the command being run is imported: `serve` must not pay for
# torch, which the training commands import at load.
COMMANDS = {
    "install-weights": "install_weights",
    "train": "train",
    "evaluate": "evaluate",
    "simulate": "simulate",
    "serve": "serve",
    "worker": "serve",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone when it is known, else for every sub-command (for --help)."""
    parser = argparse.ArgumentParser(prog="magral", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in names:
        importlib.import_module(f"magral_core.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
        logging.basicConfig(
            level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        result: int | None = args.handler(args, config)
    except (UserError, ConfigError) as exc:
        print(f"magral {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
