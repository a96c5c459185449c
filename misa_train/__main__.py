"""``python -m misa_train``: train with the options of misa_train.cli (``--help`` lists them)."""

from __future__ import annotations

import sys

from misa_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
