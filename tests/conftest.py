"""Hypothesis profiles for the property tests (tests/test_*_props.py).

``ci`` (the default) runs 500 examples per property, derandomised so that the statistical tests (z-scores with
Bonferroni bounds) are a fixed, reproducible set of cases rather than a fresh gamble on every run; ``dev`` is a
quick local loop; ``thorough`` is for hunting bugs. Pick one with HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=500, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=50, **_common)
settings.register_profile("thorough", max_examples=5000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
