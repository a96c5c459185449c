"""Multi-process MISA on CPU with the gloo backend (misa_train/distributed.py).

The 2-process run must reproduce the single-process run: each rank takes half of every global batch and the
loss is normalised by the global token count, so the averaged gradients are the single-process ones up to
float summation order. Tolerance: relative 1e-4 on every logged step loss (observed ~1e-7) and identical
active sets. Runtime on 2 CPU cores: about 60 s for the whole file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from misa_train import distributed
from misa_train.config import ConfigError
from misa_train.report import read_metrics
from tests.trainer_helpers import (
    PYTHON,
    ROOT,
    cli_args,
    make_data_file,
    make_model_dir,
    subprocess_env,
    tiny_config,
)

LOSS_RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"}


def _active_sets(run_dir: Path) -> list[list[int]]:
    return [r["active"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "period"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return make_model_dir(root / "model"), make_data_file(root / "data.jsonl"), root


def test_two_processes_match_one_and_resume_on_one(tiny_files):
    """torchrun -nproc 2 (gloo) == single process; a 1-process resume continues the 2-process DCP checkpoint."""
    from misa_train.train import run

    model_dir, data_file, root = tiny_files
    # 10 steps, T=2: the first draws explore, the last ones are driven by the all-reduced importance
    kw = dict(max_steps=10, save_every=4, eval_every=0, gen_eval_examples=0, keep_last=5)
    single = run(tiny_config(model_dir, data_file, root / "one", **kw))
    assert single["exit_code"] == 0

    two = root / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "misa_train", *cli_args(tiny_config(model_dir, data_file, two, **kw))]
    proc = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), "MISA_DIST_TIMEOUT": "60"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("misa_train: done") == 1  # rank 0 only reports

    want, got = _losses(root / "one"), _losses(two)
    assert sorted(got) == sorted(want) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=LOSS_RTOL)
    assert _active_sets(two) == _active_sets(root / "one")
    s1 = json.loads((root / "one" / "importance.json").read_text())
    s2 = json.loads((two / "importance.json").read_text())
    np.testing.assert_allclose(_scores(s2), _scores(s1), rtol=1e-3)
    ckpt = two / "checkpoints" / "step-0000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2 and distributed.is_dcp_checkpoint(ckpt)

    # resume the 2-process checkpoint in this single process: DCP reshards into unsharded tensors
    resumed = run(tiny_config(model_dir, data_file, root / "resumed", resume=str(ckpt), **kw))
    assert resumed["start_step"] == 4 and resumed["exit_code"] == 0
    back = _losses(root / "resumed")
    assert sorted(back) == list(range(5, 11))
    np.testing.assert_allclose([back[s] for s in range(5, 11)], [got[s] for s in range(5, 11)], rtol=LOSS_RTOL)
    assert _active_sets(root / "resumed") == _active_sets(two)[2:]


def _scores(imp: dict) -> list[float]:
    return [float(x) for x in imp["scores"]]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: shard the tiny model, train 6 MISA steps, record what each rank saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), MISA_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from misa_train.methods import build_method
    from misa_train.modules import count_parameters, find_modules
    from tests.helpers_tiny import make_tiny, tiny_batches

    cfg = tiny_config(Path("."), Path("."), Path("."), delta=0.2, period=2)
    dist = distributed.setup(cfg)
    try:
        model, tok = make_tiny("llama", seed=0)
        model = dist.shard(model, torch.float32, torch.device("cpu"))
        modules = find_modules(model)
        method = build_method(cfg, model, modules, count_parameters(model))
        method.allreduce = dist.allreduce_sum
        record: dict = {"active": [], "grads_only_active": [], "dtensor_state": [], "state_numel": []}
        batches = list(tiny_batches(tok, n=8, batch_size=4))
        for step in range(6):
            if method.begin_period(step):
                active = method.active_indices().tolist()
                dist.check_same_active(active)
                record["active"].append(active)
            batch = dist.local_batch(batches[step % len(batches)])
            model(**batch).loss.backward()
            with_grad = sorted(i for i, m in enumerate(modules) if m.param.grad is not None)
            frozen_grads = [n for n, p in model.named_parameters()
                            if p.grad is not None and n not in set(method.optimizer.active_names)]
            record["grads_only_active"].append(with_grad == sorted(method.active_indices().tolist())
                                               and not frozen_grads)
            method.after_backward()
            method.step(1e-3)
            if (step + 1) % 2 == 0:
                method.end_period()
        st = method.optimizer.state
        record["dtensor_state"] = all(isinstance(s["exp_avg"], DTensor) for s in st.values())
        record["state_numel"] = sum(s["exp_avg"].to_local().numel() for s in st.values())
        record["active_numel"] = sum(method.optimizer._params[n].numel() for n in st)
        record["scores"] = np.asarray(method.sampler.scores).tolist()
        try:  # a rank that disagrees must make every rank fail, not hang
            dist.check_same_active([rank])
            record["mismatch"] = "not detected"
        except distributed.DistributedError as e:
            record["mismatch"] = str(e)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.close()


def test_ranks_draw_identical_sets_and_only_active_modules_get_grads(tmp_path):
    """Both ranks report the same active sets and scores; grads (hence reductions) exist only for active
    modules; Adam state is a DTensor holding this rank's half; a deliberate disagreement is caught."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["active"] == r1["active"] and len(r0["active"]) == 3
    np.testing.assert_allclose(r0["scores"], r1["scores"], rtol=0, atol=0)
    assert all(r0["grads_only_active"]) and all(r1["grads_only_active"])
    assert r0["dtensor_state"] and r1["dtensor_state"]
    assert r0["state_numel"] + r1["state_numel"] == r0["active_numel"]  # sharded, not replicated
    assert "ranks drew different active module sets" in r0["mismatch"]
    assert "ranks drew different active module sets" in r1["mismatch"]


def test_init_failure_is_one_line_and_nonzero(tiny_files, tmp_path):
    """A rank whose peer never shows up fails after MISA_DIST_TIMEOUT with one line, exit code 2."""
    model_dir, data_file, _ = tiny_files
    env = {**subprocess_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "MISA_DIST_TIMEOUT": "2"}
    cmd = [PYTHON, "-m", "misa_train", *cli_args(tiny_config(model_dir, data_file, tmp_path / "r"))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("misa_train: error: distributed: gloo process group init failed on rank 0 of 2")
    assert sum("misa_train: error" in ln for ln in lines) == 1 and "Traceback" not in proc.stderr


def test_bad_world_configurations_are_refused(monkeypatch, tmp_path):
    """World larger than the layer count, batch not divisible, lora, unknown backend, unreshardable resume."""
    from tests.helpers_tiny import make_tiny

    model, _ = make_tiny("llama", num_layers=2)
    with pytest.raises(distributed.DistributedError, match="world size 3 exceeds the model's 2 decoder layers"):
        distributed.Dist(world=3).shard(model, torch.float32, torch.device("cpu"))
    cfg = tiny_config(Path("."), Path("."), tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="batch_size: 3 is not divisible by the world size 2"):
        distributed.setup(cfg.replace(batch_size=3))
    with pytest.raises(distributed.DistributedError, match="lora is not supported"):
        distributed.setup(cfg.replace(method="lora"))
    monkeypatch.setenv(distributed.ENV_BACKEND, "mpi")
    with pytest.raises(distributed.DistributedError, match="expected nccl or gloo"):
        distributed.setup(cfg)
    monkeypatch.setenv(distributed.ENV_BACKEND, "nccl")
    if not torch.cuda.is_available():
        with pytest.raises(distributed.DistributedError, match="nccl needs CUDA"):
            distributed.setup(cfg)
    # safetensors checkpoints hold full tensors of one process: only the same world size may resume them
    with pytest.raises(ConfigError, match="cannot be resharded to 2"):
        distributed.resumable_world({"world_size": 1}, 2, tmp_path)
    assert distributed.resumable_world({"world_size": 1}, 1, tmp_path) == 1
    assert distributed.resumable_world({"world_size": 2, "format": "dcp"}, 3, tmp_path) == 3
    single = distributed.Dist()
    batch = {"input_ids": torch.arange(8).view(4, 2)}
    assert single.local_batch(batch) is batch and not single.sharded and single.is_main


def test_nccl_setup_selects_the_local_gpu_before_the_process_group(monkeypatch, tmp_path):
    """Object collectives (the run-folder broadcast) use the current CUDA device: it must be cuda:LOCAL_RANK
    before the group exists, or rank 1's buffer lands on cuda:0 and NCCL refuses it (seen on 2 H200s)."""
    import torch.distributed as tdist

    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tdist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))

    def fake_init(backend, **kw):
        calls.append(("init", backend, kw.get("device_id")))
        raise RuntimeError("stop here")

    monkeypatch.setattr(tdist, "init_process_group", fake_init)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(distributed.ENV_BACKEND, "nccl")
    with pytest.raises(distributed.DistributedError, match="nccl process group init failed on rank 1 of 2"):
        distributed.setup(tiny_config(Path("."), Path("."), tmp_path))
    assert calls == [("set_device", 1), ("init", "nccl", torch.device("cuda", 1))]


def test_a_failed_nccl_rank_aborts_its_group_instead_of_waiting_for_peers(monkeypatch):
    """destroy_process_group waits for collectives a dead peer never joins; after a failure NCCL aborts."""
    import torch.distributed as tdist

    seen: list[str] = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: seen.append("destroy"))
    monkeypatch.setattr(tdist.distributed_c10d, "_abort_process_group", lambda: seen.append("abort"))
    nccl, gloo = distributed.Dist(2, 0, 0, "nccl"), distributed.Dist(2, 0, 0, "gloo")
    nccl.close(failed=True)
    nccl.close()
    gloo.close(failed=True)
    assert seen == ["abort", "destroy", "destroy"]


def test_bf16_masters_are_rounded_back_into_sharded_weights(tmp_path):
    """Under FSDP a bf16 weight and its fp32 master are DTensors; DTensor has no rule for _foreach_copy_, so
    the optimizer copies shard to shard (the 2-H200 run stopped here; the fp32 CPU runs never copy)."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from misa_train.optim import ActiveAdamW

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)).to(torch.bfloat16)
        fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
        weight = net[0].weight
        assert hasattr(weight, "to_local")  # a DTensor
        opt = ActiveAdamW([("w", weight)])
        opt.set_active(["w"])
        before = weight.detach().full_tensor().float().clone()
        weight.grad = torch.distributed.tensor.distribute_tensor(
            torch.ones(4, 4, dtype=torch.bfloat16), weight.device_mesh, weight.placements)
        opt.step(0.1)
        after = weight.detach().full_tensor().float()
        np.testing.assert_allclose((before - after).numpy(), 0.1, rtol=0.02)  # Adam's first step: lr·sign(g)
    finally:
        tdist.destroy_process_group()


def test_sharded_forward_loss_is_the_chunked_sum_over_the_global_count():
    """Under FSDP each rank returns sum_local/(n_global/world) through the root module's call (the chunked
    loss stands in for its forward for that call only); ranks may hold different numbers of targets."""
    from misa_train.losses import model_loss
    from misa_train.train import forward_loss
    from tests.helpers_tiny import make_tiny

    model, _ = make_tiny("llama", num_layers=2)
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :6] = -100  # targets are labels[:, 1:]: 3 + 8 = 11 on this rank
    batch = {"input_ids": ids, "labels": labels, "num_items_in_batch": torch.tensor(7.5)}
    got = forward_loss(model, batch, sharded=True)
    want = model_loss(model, {"input_ids": ids, "labels": labels}) * 11 / 7.5
    torch.testing.assert_close(got, want)
    assert "forward" not in model.__dict__  # the model's own forward is back
    assert model(input_ids=ids).logits.shape == (2, 9, model.config.vocab_size)
