"""``python -m fastbert`` runs the command line (the same as the ``fastbert`` console script)."""

import sys

from fastbert.cli import main

if __name__ == "__main__":
    sys.exit(main())
