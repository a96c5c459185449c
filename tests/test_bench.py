"""Chunked cross-entropy equals F.cross_entropy (value and gradients); the GPU bench (benchmarks/bench_gpu.py)
runs end to end on CPU with a tiny Llama (--quick), writing its JSON and table; the loss and simulator benchmarks
run on tiny inputs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from misa_train.losses import chunked_causal_lm_loss, model_loss, reference_causal_lm_loss  # noqa: E402


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_ce_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 23, 16, generator=g, dtype=torch.float32, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, 40, (2, 23), generator=g)
    y[0, 3:8] = -100
    a = chunked_causal_lm_loss(h, w, y, chunk_tokens=chunk)
    ga = torch.autograd.grad(2.5 * a, (h, w))
    b = reference_causal_lm_loss(h, w, y)
    gb = torch.autograd.grad(2.5 * b, (h, w))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for x, z in zip(ga, gb, strict=True):
        assert torch.allclose(x, z, rtol=1e-4, atol=1e-7)


def test_chunked_ce_frozen_head_and_frozen_hidden():
    h = torch.randn(1, 9, 8, requires_grad=True)
    w = torch.randn(11, 8)
    y = torch.randint(0, 11, (1, 9))
    (gh,) = torch.autograd.grad(chunked_causal_lm_loss(h, w, y, chunk_tokens=4), (h,))
    (rh,) = torch.autograd.grad(reference_causal_lm_loss(h, w, y), (h,))
    assert torch.allclose(gh, rh, atol=1e-6)
    w.requires_grad_(True)
    h2 = h.detach()
    (gw,) = torch.autograd.grad(chunked_causal_lm_loss(h2, w, y, chunk_tokens=4), (w,))
    (rw,) = torch.autograd.grad(reference_causal_lm_loss(h2, w, y), (w,))
    assert torch.allclose(gw, rw, atol=1e-6)


def test_chunked_ce_refuses_a_second_backward():
    """Its saved head gradient is scaled in place in backward (4·V·h less at the loss node), so a second pass
    through the same graph would scale it twice: that is an error naming the cause, not a wrong gradient."""
    h = torch.randn(1, 9, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (1, 9))
    loss = chunked_causal_lm_loss(h, w, y, chunk_tokens=4)
    (3.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_model_loss_equals_hf_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert model_loss(m, batch).item() == pytest.approx(m(**batch).loss.item(), rel=1e-5)


def test_bench_quick(tmp_path, capsys):
    from benchmarks import bench_gpu as bench

    rc = bench.main(["--quick", "--out", str(tmp_path), "--methods", "misa1,badam,lora", "--ckpt", "both",
                     "--steps", "2"])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["pred_gib"] > 0 for r in rows)
    assert {"device", "torch", "transformers", "git_commit"} <= set(data["meta"])
    # the sampled methods switch their active set inside the timed steps (period 2)
    assert len(rows[0]["draws"]) >= 3
    assert "peak GiB" in capsys.readouterr().out


def test_bench_rejects_unknown_names(tmp_path):
    from benchmarks import bench_gpu as bench

    assert bench.main(["--quick", "--out", str(tmp_path), "--methods", "sgd"]) == 2


def test_bench_quick_with_torchs_loss(tmp_path):
    """--loss-backend torch runs the trainer's step through F.linear_cross_entropy and says so in the record."""
    from benchmarks import bench_gpu as bench
    from misa_train.losses import has_torch_linear_ce, set_default_backend

    if not has_torch_linear_ce():
        assert bench.main(["--quick", "--out", str(tmp_path), "--loss-backend", "torch"]) == 2
        return
    try:
        rc = bench.main(["--quick", "--out", str(tmp_path), "--methods", "misa1", "--ckpt", "off", "--steps", "1",
                         "--loss-backend", "torch"])
    finally:
        set_default_backend("chunked")
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["loss_backend"] == "torch" and data["rows"][0]["status"] == "ok"


def test_loss_memory_compares_losses_and_gradients(tmp_path):
    """The loss benchmark's CPU mode: every backend's loss and hidden-state gradient against the chunked one."""
    from benchmarks import loss_memory

    out = tmp_path / "loss.json"
    assert loss_memory.main(["--device", "cpu", "--vocab", "300", "--seq", "40", "--hidden", "16", "--repeats", "1",
                             "--dtype", "fp32", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows][0] == "chunked" and "reference" in [r["backend"] for r in rows]
    assert all(r["rel_diff_vs_chunked"] < 1e-5 and r["grad_rel_diff_vs_chunked"] < 1e-5 for r in rows)
    assert rows[0]["grad_rel_diff_vs_chunked"] == 0.0


def test_loss_memory_torch_policies_add_a_row_per_variant(tmp_path):
    from benchmarks import loss_memory
    from misa_train.losses import has_torch_linear_ce

    out = tmp_path / "loss.json"
    assert loss_memory.main(["--device", "cpu", "--vocab", "300", "--seq", "40", "--hidden", "16", "--repeats", "1",
                             "--dtype", "fp32", "--torch-policies", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    torch_rows = ["torch", "torch:bf16mean", "torch:compact", "torch:balanced", "torch:accurate"]
    # without F.linear_cross_entropy the torch rows are left out, not failed
    assert [r["backend"] for r in rows] == ["chunked", *(torch_rows if has_torch_linear_ce() else []), "reference"]
    assert all(r["rel_diff_vs_chunked"] < 1e-5 and r["grad_rel_diff_vs_chunked"] < 1e-5 for r in rows)


def test_bench_simulator_prints_the_median_and_the_cost_split(capsys):
    from benchmarks import bench_simulator

    bench_simulator.main(["--K", "30", "--seeds", "2", "--repeats", "1", "--delta", "0.1"])
    out = capsys.readouterr().out
    assert "median" in out and "cost split: draw+observe of all 2 seeds" in out and "oracle gradient" in out
