"""Loss backends: torch's F.linear_cross_entropy (where the installed torch has it) equals the chunked loss
and the unchunked definition, values and gradients, on CPU."""

from __future__ import annotations

import pytest
import torch

from misa_train import losses
from misa_train.config import ConfigError
from misa_train.losses import (
    causal_lm_loss,
    chunked_causal_lm_loss,
    has_torch_linear_ce,
    reference_causal_lm_loss,
    set_default_backend,
)
from tests.helpers_tiny import make_tiny

needs_torch_lce = pytest.mark.skipif(not has_torch_linear_ce(),
                                     reason=f"torch {torch.__version__} has no F.linear_cross_entropy")


def _inputs(seed=0, B=3, S=37, h=16, V=300):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, h, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(V, h, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :10] = -100  # a masked prompt
    labels[2, -5:] = -100  # padding
    return hidden, weight, labels


@needs_torch_lce
@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_backend_equals_the_definition(backend):
    hidden, weight, labels = _inputs()
    got = causal_lm_loss(hidden, weight, labels, backend=backend)
    g_h, g_w = torch.autograd.grad(got, (hidden, weight))
    want = reference_causal_lm_loss(hidden, weight, labels)
    r_h, r_w = torch.autograd.grad(want, (hidden, weight))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, r_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-4, atol=1e-6)


@needs_torch_lce
def test_torch_backend_equals_chunked_through_the_model():
    """model_loss under each default backend: the same loss and parameter gradients on a tiny Llama."""
    model, _ = make_tiny("llama")
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.masked_fill(torch.arange(24) < 6, -100)}
    out = {}
    try:
        for backend in ("chunked", "torch"):
            set_default_backend(backend)
            model.zero_grad()
            loss = losses.model_loss(model, batch)
            loss.backward()
            out[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    finally:
        set_default_backend("chunked")
    torch.testing.assert_close(out["torch"][0], out["chunked"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["torch"][1], out["chunked"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_falls_back_to_chunked_and_bad_names_are_config_errors(monkeypatch):
    hidden, weight, labels = _inputs(seed=2)
    monkeypatch.setattr(losses, "has_torch_linear_ce", lambda: False)
    torch.testing.assert_close(causal_lm_loss(hidden, weight, labels, backend="auto"),
                               chunked_causal_lm_loss(hidden, weight, labels), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="^loss_backend: torch .* has no F.linear_cross_entropy"):
        set_default_backend("torch")
    with pytest.raises(ConfigError, match="^loss_backend: unknown 'fast'"):
        set_default_backend("fast")


@needs_torch_lce
def test_trainer_run_with_the_torch_backend_matches_chunked(tmp_path):
    from misa_train.report import read_metrics
    from misa_train.train import run
    from tests.trainer_helpers import make_data_file, make_model_dir, tiny_config

    model_dir, data = make_model_dir(tmp_path / "m"), make_data_file(tmp_path / "d.jsonl")
    got = {}
    for backend in ("chunked", "torch"):
        run(tiny_config(model_dir, data, tmp_path / backend, max_steps=3, gen_eval_examples=0, save_every=0,
                        loss_backend=backend, save_hf=False))
        got[backend] = [x for e in read_metrics(tmp_path / backend / "metrics.jsonl") if e["event"] == "train"
                        for x in e["losses"]]
    set_default_backend("chunked")
    assert len(got["torch"]) == 3
    torch.testing.assert_close(torch.tensor(got["torch"]), torch.tensor(got["chunked"]), rtol=1e-5, atol=1e-6)


@needs_torch_lce
def test_torch_backend_takes_the_mean_in_fp32_for_bf16_inputs():
    """torch's own bf16 mean is a bf16 number (on an H200 it was 6.6e-2 off); the backend's fp32 mean of
    torch's per-token losses must stay within bf16 rounding of each token's loss from the exact value."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 257, 32, generator=g).bfloat16()
    weight = (torch.randn(1000, 32, generator=g) * 32 ** -0.5).bfloat16()
    labels = torch.randint(0, 1000, (2, 257), generator=g)
    labels[:, :40] = -100
    exact = chunked_causal_lm_loss(hidden, weight, labels)
    torchs_mean = losses.torch_causal_lm_loss(hidden, weight, labels, fp32_mean=False)
    ours = losses.torch_causal_lm_loss(hidden, weight, labels)
    assert torchs_mean == torchs_mean.bfloat16().float()  # the path that rounds the mean to bf16
    assert ours != ours.bfloat16().float()  # a mean taken in fp32
    assert abs(float(ours - exact)) / float(exact) < 2e-3


@needs_torch_lce
def test_auto_takes_torch_only_while_the_head_trains():
    hidden, weight, labels = _inputs(seed=4)
    trained = causal_lm_loss(hidden, weight, labels, backend="auto")
    assert torch.equal(trained, losses.torch_causal_lm_loss(hidden, weight, labels))
    frozen = causal_lm_loss(hidden, weight.detach(), labels, backend="auto")
    assert torch.equal(frozen, chunked_causal_lm_loss(hidden, weight.detach(), labels))
