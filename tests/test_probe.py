"""The importance probe: one backward measures every module's ‖g‖², leaves no trace but the sampler's scores."""

from __future__ import annotations

import json

import numpy as np
import torch

from misa_train import train
from tests.test_methods import batch, make
from tests.trainer_helpers import make_data_file, make_model_dir, tiny_config


def _loss_fn(m):
    ids = batch(0)
    return lambda: m.model(input_ids=ids, labels=ids).loss


def test_probe_observes_every_module_with_its_true_sq_norm():
    m, _ = make("llama", delta=0.2)
    assert m.sampler.exploring
    # the reference: every module trainable, plain backward
    ref = {mod.name: None for mod in m.modules}
    for mod in m.modules:
        mod.param.requires_grad_(True)
    _loss_fn(m)().backward()
    for mod in m.modules:
        ref[mod.name] = float(mod.param.grad.double().pow(2).sum())
        mod.param.grad = None
        mod.param.requires_grad_(False)
    before = {n: p.requires_grad for n, p in m.model.named_parameters()}
    assert m.probe_importance(_loss_fn(m))
    assert not m.sampler.exploring  # importance is trusted from the first draw
    np.testing.assert_allclose(m.sampler.scores, [ref[mod.name] for mod in m.modules], rtol=1e-5)
    assert all(p.grad is None for p in m.model.parameters())  # nothing leaks into the first step
    assert before == {n: p.requires_grad for n, p in m.model.named_parameters()}
    assert m.optimizer.state_bytes() == 0  # no optimizer state was created for the probe
    assert not m.probe_importance(_loss_fn(m))  # once per run


def test_probe_is_a_no_op_for_methods_without_scores():
    for method in ("full", "lisa", "badam"):
        m, _ = make("llama", method=method)
        assert not m.probe_importance(_loss_fn(m))


def test_trainer_probes_without_shifting_the_data_order(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    data = make_data_file(tmp_path / "data.jsonl")
    runs = {}
    for probe in (True, False):
        cfg = tiny_config(model_dir, data, tmp_path / f"run{probe}", probe_importance=probe, max_steps=4,
                          period=2, method="misa")
        torch.manual_seed(0)
        train.run(cfg)
        events = [json.loads(x) for x in (tmp_path / f"run{probe}" / "metrics.jsonl").read_text().splitlines()]
        runs[probe] = events
    assert any(e["event"] == "probe" for e in runs[True])
    assert not any(e["event"] == "probe" for e in runs[False])
    # step 0's loss is taken before any update: equal only if the probe consumed no batch and changed no weight
    first = [next(e for e in runs[p] if e["event"] == "train") for p in (True, False)]
    assert first[0]["losses"][0] == first[1]["losses"][0]
