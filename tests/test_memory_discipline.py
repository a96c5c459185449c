"""After every switch the optimizer holds exactly what the active set implies, and nothing else trains.

Invariants checked at each draw (the memory claim of MISA/LISA/BAdam rests on them):
* requires_grad is True exactly for active modules ∪ always-on parameters; every other parameter has
  grad None;
* Adam state = 2 fp32 tensors per active parameter (8 bytes per number), fp32 master = 4 bytes per number
  of active bf16 parameters, 0 for fp32 weights; parked (retained) state only under retain_state;
* the moment tensors of a module that left are garbage (no reference survives the switch);
* the active modules fit the budget ⌊δ · total_params⌋.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from tests.test_methods import make, train


def _check(m, leaving_refs, budget, retained_expected=None):
    active = set(m.optimizer.active_names)
    mods = {m.modules[i].name for i in m.active_indices()}
    assert mods <= active
    named = dict(m.model.named_parameters())
    for n, p in named.items():
        assert p.requires_grad == (n in active), n
        if n not in active:
            assert p.grad is None, n
    numel = sum(named[n].numel() for n in active)
    low = sum(named[n].numel() for n in active if named[n].dtype in (torch.bfloat16, torch.float16))
    assert m.optimizer.state_bytes() == 8 * numel
    assert m.optimizer.master_bytes() == 4 * low
    st = m.stats()
    assert st["active_params"] == numel and st["state_bytes"] == 8 * numel
    assert st["active_module_params"] <= budget
    # no gc.collect(): plain reference counting must free them at the switch, not a later GC pass
    alive = [n for n, r in leaving_refs if r() is not None and n not in active]
    if retained_expected is None:
        assert not alive, f"state of modules that left is still referenced: {alive[:3]}"
        assert m.optimizer.retained_bytes() == 0
    else:
        assert m.optimizer.retained_bytes() == retained_expected(m)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("gemma", torch.bfloat16),
                                        ("gpt2", torch.bfloat16), ("mistral", torch.float32)])
def test_switches_free_exactly_what_left(arch, dtype):
    m, cfg = make(arch, dtype=dtype, delta=0.15, period=1, train_norms=True)
    budget = math.floor(cfg.delta * m.total_params)
    refs: list = []
    switches = []

    def on_switch(mm):
        _check(mm, refs, budget)
        switches.append(frozenset(mm.active_indices().tolist()))
        refs.clear()
        for n, s in mm.optimizer.state.items():
            refs.extend((n, weakref.ref(t)) for k, t in s.items() if k != "step")

    train(m, cfg, 6, lr=1e-3, on_switch=on_switch)
    assert len(switches) == 6 and len(set(switches)) > 1  # the set really changed


def test_retain_state_parks_exactly_the_visited_inactive_modules():
    m, cfg = make("llama", delta=0.15, period=1, retain_state=True)
    visited: set[str] = set()

    def expected(mm):
        named = dict(mm.model.named_parameters())
        parked = visited - set(mm.optimizer.active_names)
        return 8 * sum(named[n].numel() for n in parked)

    def on_switch(mm):
        _check(mm, [], math.floor(cfg.delta * mm.total_params), retained_expected=expected)
        visited.update(mm.optimizer.active_names)

    train(m, cfg, 5, lr=1e-3, on_switch=on_switch)
    assert m.optimizer.retained_bytes() > 0


def test_frozen_groups_stay_frozen_through_a_whole_run():
    m, cfg = make("qwen2", delta=0.1, period=2)
    emb = m.model.get_input_embeddings().weight
    norms = [p for n, p in m.model.named_parameters() if p.dim() == 1]
    before = [emb.detach().clone()] + [p.detach().clone() for p in norms]
    train(m, cfg, 4)
    assert not emb.requires_grad and emb.grad is None
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, [emb] + norms, strict=True))
