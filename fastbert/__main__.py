"""``python -m fastbert`` runs the command line."""

import sys

from fastbert.cli import main

sys.exit(main())
