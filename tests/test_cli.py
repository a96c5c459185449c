"""Command line: every config field is an option; bad input is one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from misa_train.cli import build_parser
from misa_train.config import FIELDS
from tests.trainer_helpers import make_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "misa_train", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=120)


def test_every_field_is_an_option_with_help():
    text = build_parser().format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text, name
    assert "--config" in text and "Exit codes" in text


def test_help_exits_zero():
    res = _cli("--help")
    assert res.returncode == 0 and "--max-steps" in res.stdout


@pytest.mark.parametrize("args, field", [
    (["--delta", "2"], "delta"),
    (["--method", "sgd"], "method"),
    (["--lr", "abc"], "lr"),
    (["--data", "/no/such.jsonl"], "data"),
    (["--config", "/no/such.yaml"], "config"),
    (["--bogus-flag"], "unrecognized"),
])
def test_bad_input_is_one_line_exit_2(args, field):
    res = _cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("misa_train: error: ") and field in lines[0]
    assert "Traceback" not in res.stderr


def test_binary_config_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    res = _cli("--config", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"misa_train: error: config: {path} is not a text file "
                                                "(expected YAML or JSON)"]


def test_model_dependent_check_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    # the budget check needs the loaded model (delta below the smallest module's share); in-process,
    # since a child would spend its time importing torch for what the cases above already show
    from misa_train.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["--model", str(tiny_model_dir), "--delta", "1e-6", "--output-dir", str(tmp_path / "r"),
              "--device", "cpu", "--no-progress"])
    assert ex.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("misa_train: error: delta:")


def test_unusable_output_dir_is_one_line_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from misa_train import models
    from misa_train.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(models, "load_model", no_model)  # train.run imports it from there at call time
    with pytest.raises(SystemExit) as ex:
        main(["--output-dir", str(blocker / "run"), "--device", "cpu", "--no-progress"])
    assert ex.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("misa_train: error: output_dir: cannot create the run folder"), lines


def test_cli_path_validates_the_config_once(tmp_path, capsys, monkeypatch):
    from misa_train import models
    from misa_train.cli import main
    from misa_train.config import TrainConfig

    calls = []
    real = TrainConfig.validate

    def counting(self):
        calls.append(1)
        return real(self)

    def stop(*a, **k):
        raise KeyboardInterrupt  # past validation and the run folder: nothing more to check

    monkeypatch.setattr(TrainConfig, "validate", counting)
    monkeypatch.setattr(models, "load_model", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--output-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert len(calls) == 1
