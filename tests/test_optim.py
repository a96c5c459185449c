"""ActiveAdamW: AdamW arithmetic, memory discipline of a changing active set, bf16 masters, persistence."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from misa_train.optim import ActiveAdamW, per_tensor_sq_norms

SHAPES = [(6, 5), (4,), (3, 7), (8, 2)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


@contextmanager
def no_host_sync():
    """Fail on the tensor->host conversions a training step must never do (item, tolist, bool, float)."""
    def boom(*_a, **_k):
        raise AssertionError("host sync in a hot path")
    with mock.patch.object(torch.Tensor, "item", boom), mock.patch.object(torch.Tensor, "tolist", boom), \
            mock.patch.object(torch.Tensor, "__bool__", boom), mock.patch.object(torch.Tensor, "__float__", boom):
        yield


def test_fixed_set_matches_torch_adamw_with_decay_groups():
    ours, ref = _params(), _params()
    opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ours)], betas=(0.8, 0.95), eps=1e-6,
                      weight_decay=0.1, decay=lambda _n, p: p.dim() >= 2)
    opt.set_active(ours)
    torch_opt = torch.optim.AdamW([{"params": [p for p in ref if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in ref if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    for t in range(6):
        lr = 1e-2 * (t + 1) / 6
        for pg in torch_opt.param_groups:
            pg["lr"] = lr
        for p, q, g in zip(ours, ref, _grads(t), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        with no_host_sync():
            opt.step(lr)
        torch_opt.step()
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_entering_param_gets_fresh_bias_correction_and_leaving_state_is_freed():
    ps = _params()
    opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)], weight_decay=0.0)
    opt.set_active(ps[:2])
    for t in range(3):
        for p, g in zip(ps[:2], _grads(t)[:2], strict=True):
            p.grad = g
        opt.step(1e-2)
    moments = [weakref.ref(opt.state["p0"][k]) for k in ("exp_avg", "exp_avg_sq")]
    before = ps[2].detach().clone()
    ref = torch.nn.Parameter(before.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    ps[0].grad = torch.ones_like(ps[0])
    opt.set_active([ps[1], ps[2]])
    assert all(r() is None for r in moments), "moments of a leaving parameter are still referenced"
    assert ps[0].grad is None and not ps[0].requires_grad
    assert ps[2].requires_grad and opt.state["p2"]["step"] == 0 and opt.state["p1"]["step"] == 3
    assert opt.state_bytes() == 8 * (ps[1].numel() + ps[2].numel()) and opt.master_bytes() == 0
    for t in range(3):
        g = _grads(10 + t)[2]
        ps[2].grad, ref.grad = g.clone(), g.clone()
        ps[1].grad = None  # a param without grad is skipped, not zero-stepped
        opt.step(1e-2)
        ref_opt.step()
    torch.testing.assert_close(ps[2].detach(), ref.detach(), rtol=0, atol=1e-7)
    assert opt.state["p1"]["step"] == 3


def test_retain_state_resumes_moments():
    ps, ref = _params(), _params()
    opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)], retain_state=True)
    ref_opt = torch.optim.AdamW([ref[0]], lr=1e-2, weight_decay=0.0)
    opt.set_active([ps[0]])
    for t in range(4):
        if t == 2:  # leave and come back: moments parked, then resumed
            opt.set_active([ps[1]])
            assert opt.retained_bytes() == 8 * ps[0].numel() and not ps[0].requires_grad
            opt.set_active([ps[0]])
            assert opt.retained_bytes() == 8 * ps[1].numel()  # now p1 is parked
        ps[0].grad, ref[0].grad = _grads(t)[0], _grads(t)[0]
        opt.step(1e-2)
        ref_opt.step()
    torch.testing.assert_close(ps[0].detach(), ref[0].detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_update_through_fp32_master(dtype):
    ps = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ps]
    opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)], weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01)
    opt.set_active(ps)
    assert opt.master_bytes() == 4 * sum(p.numel() for p in ps)
    assert opt.state_bytes() == 8 * sum(p.numel() for p in ps)
    for t in range(5):
        for p, q, g in zip(ps, ref, _grads(t, dtype), strict=True):
            p.grad, q.grad = g, g.float()
        opt.step(1e-3)
        ref_opt.step()
    for i, (p, q) in enumerate(zip(ps, ref, strict=True)):
        master = opt.state[f"p{i}"]["master"]
        torch.testing.assert_close(master, q.detach(), rtol=0, atol=1e-6)
        assert p.dtype == dtype and torch.equal(p.detach(), master.to(dtype))
    # 1e-3 steps are below bf16 resolution for most entries: the master must keep what the weight cannot
    assert not torch.equal(opt.state["p0"]["master"].to(dtype).float(), opt.state["p0"]["master"])


def test_clip_matches_torch_and_returns_unsynced_tensor():
    ps, ref = _params(), _params()
    opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)])
    opt.set_active(ps[1:])
    for p, q, g in zip(ps, ref, _grads(0), strict=True):
        p.grad, q.grad = g.clone() * 3, g.clone() * 3
    with no_host_sync():
        norm = opt.clip_grad_norm_(1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref[1:], 1.0, foreach=True)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(ps[1:], ref[1:], strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert torch.equal(ps[0].grad, ref[0].grad)  # inactive grads untouched


def test_per_tensor_sq_norms_in_fp32():
    ts = [t.to(torch.bfloat16) for t in _grads(3)]
    want = torch.stack([t.float().pow(2).sum() for t in ts])
    torch.testing.assert_close(per_tensor_sq_norms(ts), want, rtol=1e-5, atol=0)


def test_state_dict_round_trip_continues_identically():
    def run(split: bool):
        ps = _params(torch.bfloat16)
        opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)], weight_decay=0.05, retain_state=True)
        opt.set_active(ps[:3])
        for t in range(6):
            if t == 2:
                opt.set_active(ps[1:])
            if split and t == 3:
                sd = opt.state_dict()
                sd = {k: (v if k != "state" else {n: {kk: (vv.clone() if torch.is_tensor(vv) else vv)
                                                      for kk, vv in st.items()} for n, st in v.items()})
                      for k, v in sd.items()}
                weights = [p.detach().clone() for p in ps]
                ps = _params(torch.bfloat16, seed=99)  # a fresh process: different weights, no state
                with torch.no_grad():
                    for p, w in zip(ps, weights, strict=True):
                        p.copy_(w)
                opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)], weight_decay=0.05,
                                  retain_state=True)
                opt.load_state_dict(sd)
                assert opt.active_names == ["p1", "p2", "p3"] and opt.retained_bytes() > 0
            for p, g in zip(ps, _grads(t, torch.bfloat16), strict=True):
                if p.requires_grad:
                    p.grad = g
            opt.step(1e-2)
        return [p.detach() for p in ps], opt
    a, oa = run(False)
    b, ob = run(True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for n in oa.state:
        assert torch.equal(oa.state[n]["master"], ob.state[n]["master"])


def test_bad_arguments():
    p = _params()
    with pytest.raises(ValueError, match="betas"):
        ActiveAdamW([("a", p[0])], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="eps"):
        ActiveAdamW([("a", p[0])], eps=0.0)
    opt = ActiveAdamW([("a", p[0])])
    with pytest.raises(KeyError):
        opt.set_active([p[1]])
    with pytest.raises(KeyError):
        opt.set_active(["zzz"])


def test_param_looks_up_registered_names():
    ps = _params()
    opt = ActiveAdamW([(f"p{i}", p) for i, p in enumerate(ps)])
    assert opt.param("p2") is ps[2]
    with pytest.raises(KeyError, match="'nope'"):
        opt.param("nope")
