"""Hypothesis profiles for the property tests (tests/test_*_props.py), and the trainer tests' shared fixtures.

``ci`` (the default) runs 500 examples per property, derandomised so that the statistical tests (z-scores with
Bonferroni bounds) are a fixed, reproducible set of cases rather than a fresh gamble on every run; ``dev`` is a
quick local loop; ``thorough`` is for hunting bugs. Pick one with HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=500, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=50, **_common)
settings.register_profile("thorough", max_examples=5000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(tiny model folder, tiny JSONL data file) for the trainer tests; torch is imported only when asked for."""
    from tests.trainer_helpers import make_data_file, make_model_dir

    root = tmp_path_factory.mktemp("assets")
    return make_model_dir(root / "model"), make_data_file(root / "data.jsonl")


@pytest.fixture
def one_thread():
    """One torch thread for the test: on two shared cores, oversubscribed threads make tiny steps 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
