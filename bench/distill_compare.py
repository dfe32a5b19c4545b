"""The comparison study moved to the package ``pipeline.study``: run ``python -m pipeline.study``.

This forwarder keeps ``python bench/distill_compare.py [flags]`` working (same flags).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, even when not installed

from pipeline.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
