"""misa_train.lean_ops: the lean SwiGLU / RMSNorm give the Hugging Face forward exactly, the same gradients,
and save fewer bytes for backward (by exactly the predicted amount); patch_model touches only what it should."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from misa_train import lean_ops as lo  # noqa: E402
from tests.helpers_tiny import make_tiny  # noqa: E402


def _pair(arch: str = "llama", dtype: torch.dtype = torch.float32):
    """Two identical tiny models; the second patched."""
    ref, _ = make_tiny(arch)
    lean, _ = make_tiny(arch)
    ref.to(dtype)
    lean.to(dtype)
    return ref, lean, lo.patch_model(lean)


def _ids(n: int = 11, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 262, (batch, n), generator=torch.Generator().manual_seed(seed))


def _set_trainable(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(any(k in n for k in names))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_identical(arch, dtype):
    ref, lean, n = _pair(arch, dtype)
    assert n == 2 + 5  # 2 MLPs, 2 norms per layer + the final norm
    ids = _ids()
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        b = lean(input_ids=ids).logits
    # op for op the HF computation: bit-identical, bf16 included
    assert torch.equal(a, b)
    a = ref(input_ids=ids).logits
    b = lean(input_ids=ids).logits  # with autograd recording
    assert torch.equal(a, b)


TRAINABLE = ("layers.0.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj",
             "layers.0.self_attn.q_proj", "layers.1.post_attention_layernorm", "model.norm")


@pytest.mark.parametrize("input_grad", [True, False])
def test_gradients_match_fp32(input_grad):
    ref, lean, _ = _pair("llama")
    ids = _ids()
    grads = []
    for m in (ref, lean):
        _set_trainable(m, TRAINABLE)
        emb = m.model.embed_tokens(ids).detach().requires_grad_(input_grad)
        out = m(inputs_embeds=emb).logits
        loss = (out.float() ** 2).mean() + out[..., 5].sum()
        loss.backward()
        g = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        if input_grad:
            g["input"] = emb.grad
        grads.append(g)
    assert grads[0].keys() == grads[1].keys()
    assert any("layernorm" in k for k in grads[0]) and any("gate_proj" in k for k in grads[0])
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6), k


def test_gradients_close_bf16():
    ref, lean, _ = _pair("llama", torch.bfloat16)
    ids = _ids()
    grads = []
    for m in (ref, lean):
        _set_trainable(m, TRAINABLE)
        emb = m.model.embed_tokens(ids).detach().requires_grad_(True)
        m(inputs_embeds=emb).logits.float().pow(2).mean().backward()
        grads.append([emb.grad.float()] + [p.grad.float() for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        # the lean backward computes in fp32 where HF rounds intermediates to bf16
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * a.abs().max().item())


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lo.SwiGLU.apply, (g, u))
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lo.RMSNormFn.apply(a, b, 1e-6), (x, w))
    # one input without grad: the other gradient alone is still right
    assert torch.autograd.gradcheck(lambda b: lo.RMSNormFn.apply(x.detach(), b, 1e-6), (w,))
    assert torch.autograd.gradcheck(lambda a: lo.SwiGLU.apply(a, u.detach()), (g,))
    assert torch.autograd.gradcheck(lambda b: lo.SwiGLU.apply(g.detach(), b), (u,))


def test_chunked_backward_equals_one_chunk(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(2, 7, 9, generator=gen, requires_grad=True)
    u = torch.randn(2, 7, 9, generator=gen, requires_grad=True)
    x = torch.randn(2, 7, 9, generator=gen, requires_grad=True)
    w = torch.randn(9, generator=gen, requires_grad=True)
    dy = torch.randn(2, 7, 9, generator=gen)

    def grads():
        return (torch.autograd.grad(lo.swiglu(g, u), (g, u), dy)
                + torch.autograd.grad(lo.rms_norm(x, w, 1e-5), (x, w), dy))

    whole = grads()
    monkeypatch.setattr(lo, "_CHUNK_ELEMS", 20)  # 2 rows per chunk, last chunk short
    for a, b in zip(whole, grads(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd saves over one forward (input requires grad)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    store: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            store[ptr] = t.untyped_storage().nbytes()
        return t

    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=emb)
    return sum(store.values())


def test_fewer_saved_bytes_by_the_formula():
    ref, lean, _ = _pair("llama", torch.bfloat16)
    for m in (ref, lean):
        _set_trainable(m, ())  # frozen linears (and norms): MISA's frozen part
    ids = _ids(n=16, batch=2)
    T = ids.numel()
    cfg = ref.config
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    before, after = _saved_bytes(ref, ids), _saved_bytes(lean, ids)
    assert after < before
    # per layer: silu(g) is no longer saved (2 B·T·i); each of the 2 norms keeps its bf16 input (2 B·T·h)
    # instead of an fp32 copy (4 B·T·h); r (4 B·T) is saved either way; plus the final norm
    assert before - after == L * (2 * T * i + 2 * (4 - 2) * T * h) + (4 - 2) * T * h


def test_patch_model_scope_and_idempotence():
    for arch in ("gemma", "gpt2"):
        m, _ = make_tiny(arch)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        assert lo.patch_model(m) == 0
        assert not any("forward" in mod.__dict__ for mod in m.modules())
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m, _ = make_tiny("llama")
    keys = list(m.state_dict())
    assert lo.patch_model(m) == 7
    assert lo.patch_model(m) == 0
    assert list(m.state_dict()) == keys
    assert sum(lo.is_patched(x) for x in m.modules()) == 7
    assert not lo.is_patched(m.model.layers[0].self_attn)
    assert lo.unpatch_model(m) == 7 and not any(lo.is_patched(x) for x in m.modules())


def test_patched_mlp_calls_substituted_linears():
    # peft or any wrapper replaces mlp.gate_proj; the lean forward looks it up at call time
    ref, lean, _ = _pair("llama")
    for m in (ref, lean):
        for layer in m.model.layers:
            layer.mlp.up_proj = torch.nn.Sequential(layer.mlp.up_proj, torch.nn.Tanh())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, lean(input_ids=ids).logits)
