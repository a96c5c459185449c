"""Interrupted runs, as real processes: SIGTERM/SIGINT stop cleanly with a valid checkpoint, and resuming
(from a signal's checkpoint or a periodic mid-period one) reproduces the uninterrupted run's losses exactly."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from misa_train import checkpoint as ck
from misa_train.report import read_metrics
from tests.trainer_helpers import PYTHON, ROOT, cli_args, make_data_file, make_model_dir, subprocess_env
from tests.trainer_helpers import tiny_config as _tiny

STEPS = 40


def tiny_config(model, data, out, **kw):
    # long enough (40 steps) that a signal sent after step 1 lands mid-run; no eval, to stay quick
    base = dict(max_steps=STEPS, period=4, save_every=6, keep_last=10, eval_every=0, gen_eval_examples=0)
    return _tiny(model, data, out, **{**base, **kw})


def _start(cfg):
    return subprocess.Popen([PYTHON, "-m", "misa_train", *cli_args(cfg)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(cfg):
    res = subprocess.run([PYTHON, "-m", "misa_train", *cli_args(cfg)], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _losses(run_dir):
    out = {}
    for e in read_metrics(run_dir / "metrics.jsonl"):
        if e["event"] == "train":
            first = e["step"] - len(e["losses"]) + 1
            out.update({first + i: x for i, x in enumerate(e["losses"])})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sig")
    model, data = make_model_dir(root / "model"), make_data_file(root / "data.jsonl")
    straight = root / "straight"
    # the reference run in-process (one thread, like the children): bitwise the same arithmetic
    import torch

    from misa_train.train import run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_config(model, data, straight))
    finally:
        torch.set_num_threads(n)
    return model, data, root, _losses(straight)


@pytest.mark.slow  # the SIGTERM test below already resumes mid-period in a child process
def test_resume_from_mid_period_checkpoint_is_exact(setup):
    model, data, root, straight = setup
    assert sorted(straight) == list(range(1, STEPS + 1))
    # step 6 is inside a period (T = 4): active set, Adam moments and the norm accumulator must all resume
    part = root / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "straight" / "checkpoints" / "step-0000006", part / "checkpoints" / "step-0000006")
    _run(tiny_config(model, data, part, resume="auto"))
    resumed = _losses(part)
    assert resumed == {s: straight[s] for s in range(7, STEPS + 1)}


def _interrupt(cfg, sig):
    proc = _start(cfg)
    metrics = cfg.output_dir + "/metrics.jsonl"
    deadline = time.time() + 120
    from pathlib import Path

    while time.time() < deadline and proc.poll() is None:
        if any(e["event"] == "train" for e in read_metrics(Path(metrics))):
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143),
                                       pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_stops_cleanly_and_resumes_exactly(setup, sig, code):
    model, data, root, straight = setup
    out = root / f"sig{int(sig)}"
    cfg = tiny_config(model, data, out)
    rc, err = _interrupt(cfg, sig)
    assert rc == code, err[-2000:]
    assert "Traceback" not in err and "checkpoint saved at step" in err
    events = read_metrics(out / "metrics.jsonl")
    stop = [e for e in events if e["event"] == "stop"]
    assert stop and stop[-1]["reason"] == sig.name
    k = stop[-1]["step"]
    assert 1 <= k < STEPS
    latest = ck.resolve_checkpoint(out)
    assert latest.name == f"step-{k:07d}" and ck.read_meta(latest)["step"] == k
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    before = _losses(out)
    assert before == {s: straight[s] for s in range(1, k + 1)}
    if sig == signal.SIGTERM:  # one full resume suffices; SIGINT shares the code path
        _run(tiny_config(model, data, out, resume=str(out)))
        assert _losses(out) == straight
        assert (out / "loss.png").is_file() and (out / "importance.json").is_file()
