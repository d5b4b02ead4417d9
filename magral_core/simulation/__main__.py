"""`python -m magral_core.simulation --markdown DIR`: print the tables of DIR/results.json (as written by
`magral simulate`) as Markdown, to paste into README or docs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magral_core.simulation", description=__doc__)
    parser.add_argument("--markdown", type=Path, required=True, metavar="DIR",
                        help="a results directory (or its results.json)")
    parser.add_argument("--baseline", default=None, help="strategy to pair against (default: the file's)")
    args = parser.parse_args(argv)
    from magral_core.simulation.reports import load_results, render_markdown

    path = args.markdown / "results.json" if args.markdown.is_dir() else args.markdown
    if not path.is_file():
        print(f"{parser.prog}: error: no results file at {path}", file=sys.stderr)
        return 2
    records, full_pool, baseline = load_results(path)
    sys.stdout.write(render_markdown(records, full_pool=full_pool, baseline=args.baseline or baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
