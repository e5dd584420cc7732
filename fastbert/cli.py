"""The ``fastbert`` command line (placeholder until the CLI lands)."""

import sys


def main(argv=None) -> int:
    """Entry point of the ``fastbert`` console script."""
    print("fastbert: commands land soon", file=sys.stderr)
    return 2
