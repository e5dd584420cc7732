"""``python -m fastbert.bench`` = ``fastbert bench``."""

import sys

from fastbert.bench import main

sys.exit(main())
