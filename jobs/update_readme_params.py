#!/usr/bin/env python
"""Rewrite the README's parameter table from :data:`anomaly_dask.config.PARAMS`.

The table sits between the lines ``<!-- params:start -->`` and ``<!-- params:end -->`` of
README.md; everything outside them is left as it is. ``tests/test_config.py`` fails while
the README's table differs from the generated one.

Usage::

    python jobs/update_readme_params.py           # rewrite README.md
    python jobs/update_readme_params.py --check   # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomaly_dask.config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- params:start -->", "<!-- params:end -->"


def with_table(text: str) -> str:
    """``text`` with the part between the markers replaced by the generated table.

    Raises
    ------
    ValueError
        When the markers are missing, repeated or out of order.
    """
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must hold one {START} line followed by one {END} line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check`` only compare) the README's table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README, help="file to update (default: README.md)")
    parser.add_argument("--check", action="store_true", help="only report whether the table is current")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = with_table(text)
    if new == text:
        print(f"{args.readme}: parameter table is up to date")
        return 0
    if args.check:
        print(f"{args.readme}: parameter table is out of date; run python jobs/update_readme_params.py")
        return 1
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: parameter table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
