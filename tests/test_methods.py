"""Methods on tiny real architectures: what trains, what stays frozen, parity with AdamW, importance, resume."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from misa_train.config import TrainConfig
from misa_train.methods import build_method, layers_delta
from misa_train.modules import count_parameters, find_modules
from tests.helpers_tiny import make_tiny

ARCHS = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def make(arch="llama", num_layers=2, dtype=torch.float32, **cfg_kw):
    """(method, cfg) on a fresh tiny model in eval mode (no dropout: runs are reproducible)."""
    model, _ = make_tiny(arch, num_layers=num_layers)
    model = model.to(dtype).eval()
    cfg = TrainConfig(**{"period": 2, "delta": 0.2, "seed": 0, **cfg_kw})
    modules = find_modules(model)
    return build_method(cfg, model, modules, count_parameters(model)), cfg


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step % 3)
    return torch.randint(3, 262, (2, 10), generator=g)


def train(m, cfg, steps, start=0, lr=1e-2, on_switch=None):
    """The trainer's loop (contract order); returns the losses."""
    losses = []
    for step in range(start, start + steps):
        if m.begin_period(step) and on_switch is not None:
            on_switch(m)
        ids = batch(step)
        loss = m.model(input_ids=ids, labels=ids).loss
        loss.backward()
        m.after_backward()
        m.step(lr)
        if (step + 1) % cfg.period == 0:
            m.end_period()
        losses.append(float(loss.detach()))
    return losses


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_never_active_weights_bitwise_unchanged(arch):
    m, cfg = make(arch, delta=0.1)
    before = weights(m.model)
    ever = set()
    train(m, cfg, 8, on_switch=lambda mm: ever.update(mm.modules[i].name for i in mm.active_indices()))
    after = weights(m.model)
    assert ever
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= ever, f"frozen parameters changed: {sorted(changed - ever)[:3]}"
    assert changed, "nothing trained"
    names = [mod.name for mod in m.modules]
    assert all(n in names for n in changed)  # embeddings/head/norms are off by default


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_delta_one_matches_torch_adamw_and_method_full(arch):
    kw = dict(delta=1.0, train_embeddings=True, train_head=True, train_norms=True, weight_decay=0.1,
              betas=(0.9, 0.95), eps=1e-8)
    misa, cfg = make(arch, method="misa", **kw)
    full, _ = make(arch, method="full", **kw)
    ref_model, _ = make_tiny(arch)
    ref_model.eval()
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    nodecay = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    l_misa = train(misa, cfg, 6)
    l_full = train(full, cfg, 6)
    l_ref = []
    for step in range(6):
        ids = batch(step)
        loss = ref_model(input_ids=ids, labels=ids).loss
        loss.backward()
        ref.step()
        ref.zero_grad()
        l_ref.append(float(loss.detach()))
    assert misa.stats()["active_modules"] == len(misa.modules)
    assert l_misa == l_full  # one code path: bitwise equal
    np.testing.assert_allclose(l_misa, l_ref, rtol=0, atol=1e-6)
    wm, wf, wr = weights(misa.model), weights(full.model), weights(ref_model)
    for n in wr:
        assert torch.equal(wm[n], wf[n]), n
        torch.testing.assert_close(wm[n], wr[n], rtol=0, atol=1e-6)
    assert l_misa[-1] < l_misa[0]


def test_bf16_weights_follow_fp32_masters():
    m, cfg = make("llama", dtype=torch.bfloat16, delta=0.3)
    before = weights(m.model)
    checked = []

    def check(mm):
        # previous period's masters must round to the weights the forward pass used
        for n, st in mm.optimizer.state.items():
            assert torch.equal(mm.optimizer._params[n].detach(), st["master"].to(torch.bfloat16)), n
            checked.append(n)

    losses = train(m, cfg, 10, lr=3e-3, on_switch=check)
    check(m)
    after = weights(m.model)
    assert checked and any(not torch.equal(before[n], after[n]) for n in checked)
    assert all(p.dtype == torch.bfloat16 for p in m.model.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_only_adapters(arch):
    m, cfg = make(arch, method="lora", lora_r=4, lora_alpha=8.0)
    from peft import PeftModel

    assert isinstance(m.model, PeftModel)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = weights(m.model)
    losses = train(m, cfg, 4)
    after = weights(m.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero: it moving means the adapters learn
    st = m.stats()
    assert st["active_params"] == sum(p.numel() for n, p in m.model.named_parameters() if n in trainable)
    assert st["state_bytes"] == 8 * st["active_params"]
    assert sum("lora_A" in n for n in trainable) == len(m.modules)  # one adapter per module, no more
    assert m.active_mask().all() and losses[-1] < losses[0]


@pytest.mark.parametrize("method,k", [("lisa", 2), ("badam", 1)])
def test_layer_methods_switch_whole_layers(method, k):
    n_layers = 4
    m, cfg = make("llama", num_layers=n_layers, method=method, lisa_layers=k, badam_layers=k,
                  train_embeddings=True, period=1)
    layer_of = np.array([mod.layer for mod in m.modules])
    draws = []

    def record(mm):
        mask = mm.active_mask()
        layers = sorted(set(layer_of[mask].tolist()))
        assert len(layers) == k
        assert mask.sum() == (np.isin(layer_of, layers)).sum()  # whole layers only
        emb = mm.model.get_input_embeddings().weight
        assert emb.requires_grad  # always-on group stays on across switches
        draws.append(tuple(layers))

    train(m, cfg, 8, on_switch=record)
    assert len(draws) == 8
    if method == "badam":  # a reshuffled cycle: every pass of n_layers/k draws visits each layer once
        for p in range(0, 8, n_layers):
            assert sorted(sum(draws[p:p + n_layers], ())) == list(range(n_layers))
    else:
        assert len(set(draws)) > 1


def test_layers_delta_fits_exactly_k_layers():
    model, _ = make_tiny("llama", num_layers=4)
    mods = find_modules(model)
    total = count_parameters(model)
    per_layer = sum(m.size for m in mods if m.layer == 0)
    for k in (1, 2, 4):
        budget = int(layers_delta(mods, k, total) * total)
        assert k * per_layer <= budget < (k + 1) * per_layer
    with pytest.raises(ValueError):
        layers_delta(mods, 5, total)


def test_importance_accumulator_equals_manual_sq_norms():
    m, cfg = make("qwen2", delta=0.3, period=3)
    seen = {}
    orig_observe = m.sampler.observe

    def spy(idx, sq):
        seen["idx"], seen["sq"] = np.asarray(idx).copy(), np.asarray(sq).copy()
        orig_observe(idx, sq)

    m.sampler.observe = spy
    manual = None
    m.begin_period(0)
    from tests.test_optim import no_host_sync

    for step in range(3):
        ids = batch(step)
        m.model(input_ids=ids, labels=ids).loss.backward()
        g2 = torch.tensor([m.modules[i].param.grad.double().pow(2).sum().item() for i in m.active_indices()])
        manual = g2 if manual is None else manual + g2
        with no_host_sync():
            m.after_backward()
            m.step(1e-2)
    np.testing.assert_allclose(m._acc.double().numpy(), manual.numpy(), rtol=1e-5)
    m.end_period()
    np.testing.assert_array_equal(seen["idx"], m.active_indices())
    np.testing.assert_allclose(seen["sq"], manual.numpy() / 3, rtol=1e-5)
    assert m._acc_steps == 0


def test_reweight_scales_active_grads_by_inverse_inclusion():
    m, cfg = make("llama", delta=0.2, rule="uniform", reweight=True)
    m.begin_period(0)
    idx = m.active_indices()
    pi = m.sampler.last_inclusion[idx]
    assert np.all(pi < 1)
    ids = batch(0)
    m.model(input_ids=ids, labels=ids).loss.backward()
    raw = [m.modules[i].param.grad.clone() for i in idx]
    m.after_backward()
    for g0, i, p in zip(raw, idx, pi, strict=True):
        torch.testing.assert_close(m.modules[i].param.grad, g0 / p)


@pytest.mark.parametrize("method,retain,dtype", [("misa", True, torch.bfloat16), ("lisa", False, torch.float32),
                                                 ("badam", False, torch.float32)])
def test_state_dict_round_trip_mid_period_continues_identically(method, retain, dtype):
    kw = dict(method=method, retain_state=retain, period=3, delta=0.2, lisa_layers=1, train_norms=True,
              weight_decay=0.01)
    a, cfg = make("llama", dtype=dtype, **kw)
    la = train(a, cfg, 8)
    b, _ = make("llama", dtype=dtype, **kw)
    lb = train(b, cfg, 4)  # stops inside the second period
    buf = io.BytesIO()
    torch.save({"model": b.model.state_dict(), "method": b.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c, _ = make("llama", dtype=dtype, **{**kw, "seed": 123})  # wrong seed: state must win
    c.model.load_state_dict(ck["model"])
    c.load_state_dict(ck["method"])
    np.testing.assert_array_equal(c.active_indices(), b.active_indices())
    lc = train(c, cfg, 4, start=4)
    assert la == lb + lc
    wa, wc = weights(a.model), weights(c.model)
    assert all(torch.equal(wa[n], wc[n]) for n in wa)


def test_load_state_dict_refuses_other_method():
    a, _ = make("llama", method="misa")
    a.begin_period(0)
    b, _ = make("llama", method="lisa", lisa_layers=1)
    with pytest.raises(ValueError, match="method"):
        b.load_state_dict(copy.deepcopy(a.state_dict()))


def test_depth_bias_reaches_the_sampler_and_favours_the_top_layer():
    method, _ = make(num_layers=4, depth_bias=3.0, delta=0.1, probe_importance=False, rule="misa_norm")
    assert method.sampler.depth_bias == 3.0
    pi = method.sampler.target_inclusion()
    groups = method.sampler.groups
    assert pi[groups == groups.max()].mean() > 3 * pi[groups == 0].mean() > 0
