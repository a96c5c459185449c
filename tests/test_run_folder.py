"""The run folder and the checkpoint to resume: a fresh run never lands on another run, damaged checkpoints
are skipped for the newest intact one (and said so), and every refusal is one line, exit code 2."""

from __future__ import annotations

import pytest

from misa_train import checkpoint as ck
from misa_train.cli import main
from misa_train.config import ConfigError
from misa_train.report import read_metrics
from misa_train.run_folder import holds_run
from misa_train.train import run
from tests.trainer_helpers import cli_args, tiny_config

FAST = dict(eval_every=0, gen_eval_examples=0, keep_last=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(run_dir):
    return [x for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train" for x in e["losses"]]


def _cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("misa_train: error: ") and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_fresh_run_refuses_a_folder_holding_another_run(assets, tmp_path, capsys):
    out = tmp_path / "r"
    run(tiny_config(*assets, out, max_steps=6, save_every=3, **FAST))
    first = ck.list_checkpoints(out)
    with pytest.raises(ConfigError, match=r"^output_dir: .* already holds a run .*--resume auto.*--overwrite"):
        run(tiny_config(*assets, out, max_steps=2, save_every=1, **FAST))
    assert ck.list_checkpoints(out) == first  # nothing pruned
    line = _cli_error(cli_args(tiny_config(*assets, out, max_steps=2, save_every=1, **FAST)), capsys)
    assert "output_dir:" in line and "already holds a run" in line
    # --overwrite replaces it: only the new run's checkpoints and events remain
    run(tiny_config(*assets, out, max_steps=2, save_every=1, overwrite=True, **FAST))
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-0000001", "step-0000002"]
    assert [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "start"] == [0]
    assert len(_losses(out)) == 2


def test_overwrite_with_resume_is_refused(assets, tmp_path):
    with pytest.raises(ConfigError, match="^overwrite:"):
        run(tiny_config(*assets, tmp_path / "r", overwrite=True, resume="auto"))


def test_holds_run_needs_metrics_or_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model folder has one too
    assert holds_run(tmp_path) == []
    (tmp_path / "checkpoints").mkdir()
    assert holds_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert holds_run(tmp_path) == ["config.json", "metrics.jsonl"]


def _damage(ckpt):
    path = ckpt / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # cut short, as by a full disk or an interrupted copy


def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(assets, tmp_path, capsys):
    out = tmp_path / "r"
    cfg = tiny_config(*assets, out, max_steps=6, period=2, save_every=3, **FAST)
    run(cfg)
    straight = _losses(out)
    _damage(out / "checkpoints" / "step-0000006")
    capsys.readouterr()
    s = run(cfg.replace(resume="auto"))
    assert s["start_step"] == 3
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step-0000006 is damaged" in err and "step-0000003" in err
    assert _losses(out) == straight  # steps 4..6 again, from the intact checkpoint


def test_no_intact_checkpoint_is_one_line_error(assets, tmp_path, capsys):
    out = tmp_path / "r"
    cfg = tiny_config(*assets, out, max_steps=4, save_every=2, **FAST)
    run(cfg)
    for c in ck.list_checkpoints(out):
        _damage(c)
    with pytest.raises(ConfigError, match=r"^resume: no intact checkpoint in .*step-0000004: weights"):
        run(cfg.replace(resume="auto"))
    line = _cli_error(cli_args(cfg.replace(resume=str(out / "checkpoints" / "step-0000002"))), capsys)
    assert "resume: checkpoint" in line and "step-0000002 is damaged" in line


def test_resume_with_another_seed_is_one_line_error(assets, tmp_path, capsys):
    cfg = tiny_config(*assets, tmp_path / "r", max_steps=2, save_every=2, **FAST)
    run(cfg)
    line = _cli_error(cli_args(cfg.replace(resume="auto", seed=1, max_steps=4)), capsys)
    assert "resume: checkpoint was written with seed=0, this run has seed=1" in line
