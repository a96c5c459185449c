"""``python -m misa_theory`` (see :mod:`misa_theory.cli`)."""

from .cli import main

raise SystemExit(main())
