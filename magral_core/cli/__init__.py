"""The `magral` command: one sub-module per sub-command, each with `register(subparsers)`.

Every handler receives the parsed arguments and the process's `Config`; a `UserError` (bad path, malformed
file) prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from magral_core.config import Config, ConfigError
from magral_core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from magral_core.cli import evaluate, install_weights, serve, simulate, train

    parser = argparse.ArgumentParser(prog="magral", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (install_weights, train, evaluate, simulate, serve):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
