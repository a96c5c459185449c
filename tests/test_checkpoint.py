"""Checkpoints are atomic, pruned to keep_last, and a resumed run continues exactly."""

from __future__ import annotations

import pytest
import torch

from misa_train import checkpoint as ck
from misa_train.report import read_metrics
from misa_train.train import run
from tests.trainer_helpers import tiny_config


def _save(run_dir, step, model, keep_last=2, hook=None):
    return ck.save_checkpoint(run_dir, step, model=model, adapter_only=False, method_state={"x": step},
                              trainer_state={"step": step, "rng": ck.rng_state()}, meta={"config": {}},
                              keep_last=keep_last, _before_commit=hook)


def test_failed_save_leaves_no_partial_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    _save(tmp_path, 1, model)

    def crash(tmp_dir):
        assert (tmp_dir / "weights.safetensors").is_file()  # everything written, rename not yet done
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, hook=crash)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000001"]  # no step-2, no temp folder
    assert ck.resolve_checkpoint(tmp_path).name == "step-0000001"


def test_killed_save_leftover_is_ignored_then_cleaned(tmp_path):
    model = torch.nn.Linear(4, 3)
    _save(tmp_path, 1, model)
    stale = tmp_path / "checkpoints" / ".tmp-step-0000002-abc"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"half")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-0000001"]
    _save(tmp_path, 3, model)
    assert not stale.exists()


def test_keep_last_and_resolve(tmp_path):
    model = torch.nn.Linear(4, 3)
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, keep_last=2)
    found = ck.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000003", "step-0000004"]
    assert ck.resolve_checkpoint(found[0]) == found[0]
    assert ck.resolve_checkpoint(tmp_path / "nothing") is None


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "weights cut short": lambda c: _truncate(c / "weights.safetensors"),
    "weights with trailing bytes": lambda c: c.joinpath("weights.safetensors").write_bytes(
        c.joinpath("weights.safetensors").read_bytes() + b"\0" * 16),
    "method.pt cut short": lambda c: _truncate(c / "method.pt"),
    "trainer.pt missing": lambda c: (c / "trainer.pt").unlink(),
    "meta.json garbage": lambda c: (c / "meta.json").write_bytes(b"\x00\xff{not json"),
    "meta.json of another step": lambda c: (c / "meta.json").write_text('{"step": 99}'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_checkpoint_problem_names_the_damaged_file(tmp_path, damage):
    model = torch.nn.Linear(4, 3)
    old, new = _save(tmp_path, 1, model, keep_last=5), _save(tmp_path, 2, model, keep_last=5)
    assert ck.checkpoint_problem(old) is None and ck.checkpoint_problem(new) is None
    DAMAGE[damage](new)
    problem = ck.checkpoint_problem(new)
    assert problem is not None and damage.split()[0] in problem
    assert ck.newest_valid_checkpoint(tmp_path) == (old, [(new, problem)])


def test_weights_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(5)
    path = _save(tmp_path, 7, model)
    expected = torch.rand(3)
    other = torch.nn.Linear(4, 3)
    method_state, trainer_state = ck.load_checkpoint(path, other)
    assert torch.equal(other.weight, model.weight) and method_state == {"x": 7}
    ck.set_rng_state(trainer_state["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert ck.read_meta(path)["step"] == 7


def _losses(run_dir):
    return [x for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train" for x in e["losses"]]


@pytest.mark.parametrize("method, at", [("misa", 6), ("lora", 4)])
def test_in_process_resume_is_exact(assets, tmp_path, method, at):
    """Resume from a mid-period (6, T = 4) or boundary (4) checkpoint into a fresh folder and model."""
    torch.set_num_threads(1)
    kw = dict(method=method, max_steps=8, period=4, save_every=2, eval_every=0, gen_eval_examples=0,
              keep_last=5)
    run(tiny_config(*assets, tmp_path / "a", **kw))
    straight = _losses(tmp_path / "a")
    run(tiny_config(*assets, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / f"step-{at:07d}"),
                    **kw))
    resumed = _losses(tmp_path / "b")
    assert len(straight) == 8 and resumed == straight[at:]


def test_resume_logs_every_step_and_event_once(assets, tmp_path):
    """Resuming a run folder from an older checkpoint (as after a kill past it) cuts metrics.jsonl back to that
    checkpoint, so no step's loss and no period draw is logged twice."""
    torch.set_num_threads(1)
    kw = dict(max_steps=8, period=4, save_every=4, eval_every=0, gen_eval_examples=0, keep_last=5)
    run(tiny_config(*assets, tmp_path / "a", **kw))
    straight = read_metrics(tmp_path / "a" / "metrics.jsonl")
    run(tiny_config(*assets, tmp_path / "a", resume=str(tmp_path / "a" / "checkpoints" / "step-0000004"), **kw))
    events = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert _losses(tmp_path / "a") == [x for e in straight if e["event"] == "train" for x in e["losses"]]
    for kind in ("period", "checkpoint", "train", "end"):
        steps = [e["step"] for e in events if e["event"] == kind]
        assert len(steps) == len(set(steps)), (kind, steps)
    assert [e["step"] for e in events if e["event"] == "period"] == [0, 4]
