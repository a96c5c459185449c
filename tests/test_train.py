"""End-to-end runs of every method on a tiny model: the run folder has everything the docs promise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from misa_train.config import ConfigError, TrainConfig
from misa_train.report import read_metrics
from misa_train.train import RunStopped, lr_at, run
from tests.trainer_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", ["misa", "lisa", "badam", "full", "lora"])
def test_each_method_writes_a_complete_run_folder(assets, tmp_path, method):
    out = tmp_path / method
    s = run(tiny_config(*assets, out, method=method, lisa_layers=1))
    assert s["steps"] == 6 and s["exit_code"] == 0 and math.isfinite(s["train_loss"])
    for name in ("config.json", "metrics.jsonl", "importance.json", "loss.png", "active.png", "summary.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == method and cfg["device"] == "cpu" and cfg["dtype"] == "fp32"
    events = read_metrics(out / "metrics.jsonl")
    kinds = {e["event"] for e in events}
    assert {"start", "eval", "train", "period", "checkpoint", "end"} <= kinds
    losses = [x for e in events if e["event"] == "train" for x in e["losses"]]
    assert len(losses) == 6
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["final"] and "accuracy" in evals[-1]
    imp = json.loads((out / "importance.json").read_text())
    assert len(imp["modules"]) == len(imp["scores"]) == 14
    if method in ("misa", "lisa", "badam"):
        assert any(v > 0 for v in imp["scores"])  # the sampler observed gradient norms
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-0000003", "step-0000006"]
    assert (ckpts[-1] / "weights.safetensors").is_file()


def test_lora_checkpoint_holds_only_the_adapter(assets, tmp_path):
    from safetensors.torch import load_file

    run(tiny_config(*assets, tmp_path / "r", method="lora", max_steps=3, gen_eval_examples=0))
    tensors = load_file(str(tmp_path / "r" / "checkpoints" / "step-0000003" / "weights.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)


def test_misa_trains_only_the_budget(assets, tmp_path):
    s = run(tiny_config(*assets, tmp_path / "r", max_steps=4, gen_eval_examples=0, eval_every=0))
    total = json.loads((tmp_path / "r" / "config.json").read_text())["total_params"]
    assert 0 < s["stats"]["active_module_params"] <= int(0.2 * total)


def test_grad_accum_and_checkpointing(assets, tmp_path):
    for method in ("misa", "lora"):
        s = run(tiny_config(*assets, tmp_path / method, method=method, max_steps=2, grad_accum=2,
                            grad_checkpointing=True, gen_eval_examples=0, eval_every=0))
        assert s["steps"] == 2 and math.isfinite(s["train_loss"])


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=20)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] > 0.1 and lr_at(20, cfg) == pytest.approx(0.1)


def test_budget_below_smallest_module_is_a_config_error(assets, tmp_path):
    with pytest.raises(ConfigError, match="^delta:"):
        run(tiny_config(*assets, tmp_path / "r", delta=1e-4))
    with pytest.raises(ConfigError, match="^max_seq_len:"):
        run(tiny_config(*assets, tmp_path / "r", max_seq_len=4096))


def test_unwritable_checkpoint_folder_mid_run_is_one_line_error(assets, tmp_path, monkeypatch, capsys):
    """The second save fails as on a folder turned read-only (root ignores chmod, so the OS error is raised
    where the write happens): one-line exit 2, the earlier checkpoint and the metrics so far kept."""
    from misa_train import checkpoint as ck
    from misa_train.cli import main
    from tests.trainer_helpers import cli_args

    real = ck.save_checkpoint

    def save(run_dir, step, **kw):
        if step > 3:
            raise PermissionError(13, "Permission denied", str(run_dir))
        return real(run_dir, step, **kw)

    monkeypatch.setattr(ck, "save_checkpoint", save)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as ex:
        main(cli_args(tiny_config(*assets, out, gen_eval_examples=0)))
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("misa_train: error: output_dir: cannot write checkpoint step 6") and \
        "Permission denied" in err[-1]
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-0000003"]
    events = read_metrics(out / "metrics.jsonl")
    assert len([x for e in events if e["event"] == "train" for x in e["losses"]]) == 6
    assert events[-1]["event"] == "stop" and "checkpoint not written" in events[-1]["reason"]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, assets):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("nan")
    model = AutoModelForCausalLM.from_pretrained(str(assets[0]))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every logit, hence every loss, is NaN
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(assets[0])).save_pretrained(path)
    return path


def test_nan_loss_stop_and_skip(nan_model, assets, tmp_path):
    with pytest.raises(RunStopped, match="non-finite loss at step 1"):
        run(tiny_config(nan_model, assets[1], tmp_path / "stop", on_nan="stop", gen_eval_examples=0))
    s = run(tiny_config(nan_model, assets[1], tmp_path / "skip", on_nan="skip", max_steps=3,
                        gen_eval_examples=0))
    assert s["steps"] == 3
    nans = [e for e in read_metrics(tmp_path / "skip" / "metrics.jsonl") if e["event"] == "nan"]
    assert [e["step"] for e in nans] == [1, 2, 3]


@pytest.mark.slow
def test_smollm2_misa_loss_decreases(tmp_path):
    """The real default model, a few MISA steps on the embedded arithmetic set: training loss goes down."""
    cfg = TrainConfig(output_dir=str(tmp_path / "r"), max_steps=12, period=4, n_train=48, n_val=8,
                      eval_every=0, eval_batches=1, gen_eval_examples=0, save_every=0, log_every=1,
                      device="cpu", dtype="fp32", progress=False, lr=2e-4, warmup_steps=2)
    torch.set_num_threads(2)
    s = run(cfg)
    losses = [x for e in read_metrics(tmp_path / "r" / "metrics.jsonl") if e["event"] == "train"
              for x in e["losses"]]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert s["val_loss_end"] < s["val_loss_start"]
