"""``python -m pipeline.study``: the comparison study (see pipeline/study/__init__.py)."""

import sys

from .cli import main

sys.exit(main())
