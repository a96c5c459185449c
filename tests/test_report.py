"""The run folder's reports: metrics.jsonl mirrored to TensorBoard with report_to=tensorboard."""

from __future__ import annotations

import pytest

from misa_train.report import TENSORBOARD_DIR, MetricsLog, read_metrics


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_train_and_eval_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.log("train", 5, loss=2.5, lr=1e-4, losses=[2.4, 2.6], active_params=None)
    log.log("eval", 5, val_loss=2.75, final=False)
    log.log("period", 0, active=[1, 2])
    log.close()
    assert [e["event"] for e in read_metrics(tmp_path / "metrics.jsonl")] == ["train", "eval", "period"]
    got = _scalars(tmp_path / TENSORBOARD_DIR)
    assert got == {"train/loss": [(5, 2.5)], "train/lr": [(5, pytest.approx(1e-4))], "eval/val_loss": [(5, 2.75)]}


def test_no_tensorboard_folder_by_default(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log("train", 1, loss=1.0)
    log.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
