"""misa_train's public names: all listed in __all__, all importable from the package, and importing the
package (or asking the CLI for --help) loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import misa_train

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_definition():
    from misa_train.config import TrainConfig
    from misa_train.optim import ActiveAdamW
    from misa_train.train import run

    for name in misa_train.__all__:
        assert getattr(misa_train, name) is not None, name
    assert {"TrainConfig", "run", "ActiveAdamW", "build_method", "find_modules", "ModuleInfo"} <= set(
        misa_train.__all__)
    assert misa_train.run is run and misa_train.ActiveAdamW is ActiveAdamW and misa_train.TrainConfig is TrainConfig
    assert set(misa_train.__all__) <= set(dir(misa_train))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        misa_train.no_such_name  # noqa: B018


def test_import_and_help_load_no_torch():
    code = ("import sys, misa_train; from misa_train import TrainConfig; from misa_train.cli import build_parser; "
            "build_parser().format_help(); print('torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]
