"""misa_train.fused_ops (lean_ops + compile_ops): the torch.compile'd lean SwiGLU/RMSNorm give HF's outputs and
gradients, save exactly the bytes the eager lean ops save, compile every graph at patch time (none later, for
any sequence length or requires_grad pattern), work under non-reentrant checkpointing, and fail with one line
instead of running uncompiled. The trainer and the bench apply them.

Most tests use the ``aot_eager_decomp_partition`` backend (inductor's decompositions and min-cut partitioner,
no code generation: seconds per graph); one test compiles with inductor itself (C++ on CPU)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from misa_train import fused_ops as fo  # noqa: E402
from misa_train import lean_ops as lo  # noqa: E402
from misa_train.config import ConfigError, TrainConfig  # noqa: E402
from tests.helpers_tiny import make_tiny  # noqa: E402
from tests.test_lean_ops import TRAINABLE, _ids, _saved_bytes, _set_trainable  # noqa: E402

FAST = "aot_eager_decomp_partition"


@pytest.fixture(autouse=True)
def fast_backend(monkeypatch):
    monkeypatch.setattr(fo, "BACKEND", FAST)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(dtype=torch.float32, arch="llama", **kw):
    ref, _ = make_tiny(arch)
    fused, _ = make_tiny(arch)
    ref.to(dtype)
    fused.to(dtype)
    return ref, fused, fo.patch_model(fused, **kw)


def _grads(model, ids, input_grad):
    _set_trainable(model, TRAINABLE)
    emb = model.model.embed_tokens(ids).detach().requires_grad_(input_grad)
    out = model(inputs_embeds=emb).logits
    ((out.float() ** 2).mean() + out[..., 5].float().sum()).backward()
    g = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    if input_grad:
        g["input"] = emb.grad.float()
    return out, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_match_hf(dtype):
    ref, fused, n = _pair(dtype)
    assert n == 7 and sum(lo.patched_variant(m) == "compiled" for m in fused.modules()) == 7
    ids = _ids()
    with torch.no_grad():  # grad disabled: the plain HF ops run, bit for bit
        assert torch.equal(ref(input_ids=ids).logits, fused(input_ids=ids).logits)
    for input_grad in (True, False):
        a, ga = _grads(ref, ids, input_grad)
        b, gb = _grads(fused, ids, input_grad)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
        assert torch.allclose(a.float(), b.float(), **tol)
        assert ga.keys() == gb.keys() and any("layernorm" in k for k in ga) and any("gate_proj" in k for k in ga)
        for k in ga:
            scale = ga[k].abs().max().item() if dtype == torch.bfloat16 else 1.0
            assert torch.allclose(ga[k], gb[k], rtol=tol["rtol"], atol=tol["atol"] * scale), k
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)


def test_saves_exactly_what_the_lean_ops_save():
    _, fused, _ = _pair(torch.bfloat16)
    lean, _ = make_tiny("llama")
    lean.to(torch.bfloat16)
    lo.patch_model(lean)
    hf, _ = make_tiny("llama")
    hf.to(torch.bfloat16)
    ids = _ids(n=16, batch=2)
    for names in ((), TRAINABLE, ("layernorm",), ("layers.1.mlp.up_proj",)):
        for m in (fused, lean, hf):
            _set_trainable(m, names)
        got, want, stock = (_saved_bytes(m, ids) for m in (fused, lean, hf))
        # the memory model's lean_ops=True accounting holds for the compiled variant too
        assert got == want < stock, names


def test_every_graph_compiled_at_patch_time():
    ref, fused, _ = _pair()
    before = fo.compiled_graphs()
    assert before is not None
    for batch, seq in ((1, 5), (3, 17), (2, 40)):
        ids = _ids(n=seq, batch=batch, seed=seq)
        for names in ((), TRAINABLE, ("layers.1.mlp.gate_proj",), ("layers.0.mlp.up_proj",), ("norm",)):
            for input_grad in (False, True):
                _set_trainable(fused, names)
                emb = fused.model.embed_tokens(ids).detach().requires_grad_(input_grad)
                out = fused(inputs_embeds=emb).logits
                if out.requires_grad:
                    out.sum().backward()
                fused.zero_grad(set_to_none=True)
        with torch.no_grad():
            fused(input_ids=ids)
    # no recompilation for other lengths, batch sizes, requires_grad patterns, or grad disabled
    assert fo.compiled_graphs() == before
    # compiled lazily (a pattern the warm-up did not see): the row count is dynamic from the first graph on
    torch._dynamo.reset()
    _set_trainable(fused, TRAINABLE)
    counts = []
    for seq in (6, 19, 33):
        fused(input_ids=_ids(n=seq)).logits.sum().backward()
        counts.append(fo.compiled_graphs())
    assert counts[0] > before and counts[0] == counts[1] == counts[2]


def test_non_reentrant_checkpointing_gradients_match():
    from misa_train.train import enable_checkpointing

    ref, fused, _ = _pair()
    torch._dynamo.reset()  # compile again inside the checkpointed forward and its recomputation
    ids = _ids(n=13)
    grads = []
    for m in (ref, fused):
        enable_checkpointing(m, m)
        m.train()
        _set_trainable(m, ("layers.1.", "layers.0.mlp.up_proj"))
        m(input_ids=ids).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6), k


def test_compile_failure_is_one_line_and_patches_nothing(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("Cannot find a working triton installation\nsecond line of a long traceback")

    monkeypatch.setattr(fo, "BACKEND", broken)
    m, _ = make_tiny("llama")
    with pytest.raises(ConfigError) as e:
        fo.patch_model(m)
    msg = str(e.value)
    assert msg.startswith("compile_ops: torch.compile") and "working triton" in msg and "\n" not in msg
    assert not any(lo.is_patched(x) for x in m.modules())


def test_uncompiled_run_is_caught(monkeypatch):
    # Dynamo's "eager" backend runs the captured graph op by op, without AOTAutograd: it saves what HF's ops
    # save (silu(g), the fp32 norm input), which the check refuses (strict) or reports (the bench)
    monkeypatch.setattr(fo, "BACKEND", "eager")
    m, _ = make_tiny("llama")
    with pytest.raises(ConfigError, match=r"^compile_ops: compiled \w+ saves \d+ bytes"):
        fo.patch_model(m)
    assert not any(lo.is_patched(x) for x in m.modules())
    rep: dict = {}
    assert fo.patch_model(m, strict=False, report=rep) == 7
    assert rep["lean"] is False and any(c > lean for c, lean in rep["saved"].values())


def test_config_option_and_cli():
    from misa_train.cli import build_parser

    assert TrainConfig().compile_ops is False and TrainConfig().lean_ops is True
    TrainConfig(compile_ops=True).validate()
    TrainConfig(compile_ops=True, grad_checkpointing=True).validate()
    with pytest.raises(ConfigError, match="^compile_ops: .*lean_ops"):
        TrainConfig(compile_ops=True, lean_ops=False).validate()
    text = build_parser().format_help()
    assert "--compile-ops" in text and "--no-compile-ops" in text


@pytest.mark.parametrize("ckpt", [False, True])
def test_train_run_applies_compiled_ops(tmp_path, monkeypatch, ckpt):
    from misa_train import train
    from tests.trainer_helpers import make_data_file, make_model_dir, tiny_config

    calls = {"fused": 0, "eager": 0}
    real = fo.patch_model

    def spy(model, **kw):
        calls["fused"] += 1
        n = real(model, **kw)
        assert n == 7
        return n

    monkeypatch.setattr(fo, "patch_model", spy)
    monkeypatch.setattr(lo, "patch_model", lambda model: calls.__setitem__("eager", calls["eager"] + 1) or 0)
    cfg = tiny_config(make_model_dir(tmp_path / "model"), make_data_file(tmp_path / "data.jsonl"), tmp_path / "run",
                      compile_ops=True, grad_checkpointing=ckpt, max_steps=2, eval_every=0, save_every=0,
                      gen_eval_examples=0)
    s = train.run(cfg)
    assert s["exit_code"] == 0 and s["steps"] == 2
    assert calls == {"fused": 1, "eager": 0}  # compiled applies with and without checkpointing


def test_bench_quick_compiled(tmp_path):
    from benchmarks import bench_gpu as bench

    rc = bench.main(["--quick", "--out", str(tmp_path), "--methods", "misa1", "--ckpt", "both", "--steps", "2",
                     "--lean-ops", "compiled"])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["lean_ops"] == "compiled" and data["meta"]["warmup"] >= 2
    for r in data["rows"]:
        assert r["status"] == "ok" and r["lean_mode"] == "compiled" and r["lean_ops"] is True
        assert r["fused_as_lean"] is True and r["compile_s"] >= 0
        assert r["timed_compiles"] == 0  # no compilation inside the timed steps
        assert r["tokens_per_s"] > 0 and len(r["warmup_step_times"]) >= 2


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_inductor_codegen_matches_and_is_lean(monkeypatch):
    # the real backend (C++ kernels on CPU; Triton on CUDA), one requires_grad pattern of each op: ~7 s with
    # inductor's on-disk cache, ~16 s without on 2 cores
    monkeypatch.setattr(fo, "BACKEND", "inductor")
    gen = torch.Generator().manual_seed(3)
    g, u, x = (torch.randn(2, 9, n, generator=gen, requires_grad=True) for n in (24, 24, 16))
    w = torch.nn.Parameter(torch.randn(16, generator=gen))
    dy = torch.randn(2, 9, 24, generator=gen)
    dz = torch.randn(2, 9, 16, generator=gen)
    got = torch.autograd.grad([fo.swiglu(g, u), fo.rms_norm(x, w, 1e-5)], (g, u, x, w), (dy, dz))
    want = torch.autograd.grad([fo._swiglu_ref(g, u), fo._rms_norm_ref(x, w, 1e-5)], (g, u, x, w), (dy, dz))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for name, width in (("swiglu", 24), ("rms_norm", 16)):
        saved, lean = fo._check_one(name, width, 33, torch.device("cpu"), torch.float32, 1e-5, (True, True))
        assert saved == lean > 0
