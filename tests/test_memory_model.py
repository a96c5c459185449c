"""Arithmetic of misa_theory.memory: hand-computed small cases, monotonicity, method ordering, and the
per-layer saved-activation rule against a census of what autograd really saves (CPU, tiny Llama)."""

from __future__ import annotations

import pytest

from misa_theory import memory as mm

TINY = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
L8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def test_parameter_count_llama3_8b():
    assert mm.Arch.from_config(L8B).total_params() == 8_030_261_248
    # bf16 weights alone: the 14.96 GiB floor of the brief
    assert 2 * mm.Arch.from_config(L8B).total_params() / mm.GIB == pytest.approx(14.96, abs=0.01)


def test_layer_saved_hand_computed():
    a = mm.Arch.from_config(TINY)
    T, h, i, hq, hkv, nh = 10, 64, 224, 64, 16, 8
    frozen_with_grad, out = mm.layer_saved_bytes(a, T, True, set(), False, None)
    want = 2 * (4 * T * h + 4 * T) + 2 * (2 * T * hq) + 2 * (2 * T * hkv) + 4 * T * nh + 3 * 2 * T * i
    assert out and frozen_with_grad == want
    nothing, out = mm.layer_saved_bytes(a, T, False, set(), False, None)
    assert nothing == 0 and not out
    # an active down_proj alone (input without grad) saves only its input
    down, out = mm.layer_saved_bytes(a, T, False, {"down_proj"}, False, None)
    assert down == 2 * T * i and out


def test_optimizer_step_phase_hand_computed():
    # tiny seq: the optimizer step dominates for full fine-tuning; 2 (weight) + 12 + 2 + 4 bytes/param
    a = mm.Arch.from_config(TINY)
    e = mm.predict_peak(TINY, "full", seq=2)
    assert e.phase == "optimizer_step"
    assert e.peak_bytes == 20 * a.total_params()


def test_monotone_in_seq_and_delta():
    for ck in (False, True):
        p = [mm.predict_peak(L8B, "misa", seq=s, ckpt=ck, delta=0.01).peak_bytes for s in (512, 1024, 4096, 8192)]
        assert p == sorted(p)
    d = [mm.predict_peak(L8B, "misa", seq=1024, delta=x).peak_bytes for x in (0.01, 0.03, 0.1, 0.3)]
    assert d == sorted(d)


def test_checkpointing_saves_memory_at_long_sequences():
    for meth in ("misa", "lora", "badam"):
        assert (mm.predict_peak(L8B, meth, seq=8192, ckpt=True).peak_bytes
                < mm.predict_peak(L8B, meth, seq=8192, ckpt=False).peak_bytes)


def test_method_ordering():
    kw = dict(seq=1024, ckpt=True)
    full = mm.predict_peak(L8B, "full", **kw).peak_bytes
    lisa = mm.predict_peak(L8B, "lisa", **kw).peak_bytes
    misa = mm.predict_peak(L8B, "misa", delta=0.01, **kw).peak_bytes
    assert misa < lisa < full
    assert full > 100 * mm.GIB  # 8B full AdamW cannot fit one 80 GB card


def test_badam_backward_stops_below_its_layer_without_checkpointing():
    low = mm.predict_peak(L8B, "badam", seq=4096, active=[(0, k) for k in mm.KINDS]).peak_bytes
    high = mm.predict_peak(L8B, "badam", seq=4096, active=[(31, k) for k in mm.KINDS]).peak_bytes
    assert high < low


def test_chunked_ce_beats_full_logits():
    a = mm.predict_peak(L8B, "misa", seq=8192, ckpt=True, chunked_ce=True).peak_bytes
    b = mm.predict_peak(L8B, "misa", seq=8192, ckpt=True, chunked_ce=False).peak_bytes
    assert b - a > 8 * mm.GIB


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        mm.predict_peak(TINY, "sgd", seq=8)
    with pytest.raises(ValueError, match="seq"):
        mm.predict_peak(TINY, "misa", seq=1)


def test_flops_full_is_6n_plus_attention():
    a = mm.Arch.from_config(L8B)
    f = mm.flops_per_token(L8B, "full", seq=1024)
    n = a.total_params() - a.embed_params()  # matrices + head (+ tiny norms)
    assert f == pytest.approx(6 * n + 3 * 32 * 2 * 1024 * 4096, rel=1e-3)


@pytest.mark.parametrize("lean", [False, True])
def test_saved_activation_rule_matches_autograd_census(lean):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**TINY, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if lean:
        from misa_train import lean_ops

        assert lean_ops.patch_model(model) == 3 + 2 * 3 + 1
    a = mm.Arch.from_config(TINY)
    S = 32
    cases = [([], True), (["layers.1.self_attn.v_proj"], False), (["layers.1.mlp.down_proj"], False),
             (["layers.0.self_attn.o_proj", "layers.2.mlp.gate_proj"], False),
             (["layers.0.mlp.up_proj"], False), (["layernorm"], False), (["layernorm", "k_proj"], True),
             (["layers.1.self_attn.o_proj"], True)]  # o_proj with attention on the graph: SDPA's output storage
    for names, input_grad in cases:
        for p in model.parameters():
            p.requires_grad_(False)
        for n, p in model.named_parameters():
            if any(x in n for x in names):
                p.requires_grad_(True)
        store: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t, store=store, params=params):
            ptr = t.untyped_storage().data_ptr()
            if t.dim() >= 1 and ptr not in params:
                store[ptr] = t.untyped_storage().nbytes()
            return t

        emb = model.model.embed_tokens(torch.randint(0, 128, (1, S)))
        emb.requires_grad_(input_grad)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(inputs_embeds=emb)
        per_layer: list[set[str]] = [set(), set(), set()]
        norms = "layernorm" in names  # every decoder norm weight trains (the final norm stays frozen)
        for n in names:
            if n.startswith("layers."):
                per_layer[int(n.split(".")[1])].add(n.split(".")[-1])
            elif n != "layernorm":
                for s in per_layer:
                    s.add(n)
        x_grad, want = input_grad, 0
        for layer in range(3):
            b, x_grad = mm.layer_saved_bytes(a, S, x_grad, per_layer[layer], norms, None, lean, attn_out_shared=True)
            want += b
        if x_grad:
            want += (2 if lean else 4) * S * 64 + 4 * S  # final norm: bf16 input (lean) or fp32 copy
        rope = 2 * S * a.d * 2  # cos and sin (bf16), not in the model: they are tiny at real sizes
        assert sum(store.values()) - (rope if x_grad else 0) == want, names


def test_lean_ops_hand_computed():
    a = mm.Arch.from_config(TINY)
    T, h, i, hq, hkv, nh = 10, 64, 224, 64, 16, 8
    lean, out = mm.layer_saved_bytes(a, T, True, set(), False, None, True)
    want = 2 * (2 * T * h + 4 * T) + 2 * (2 * T * hq) + 2 * (2 * T * hkv) + 4 * T * nh + 2 * 2 * T * i
    assert out and lean == want
    stock, _ = mm.layer_saved_bytes(a, T, True, set(), False, None)
    assert stock - lean == 2 * T * i + 2 * 2 * T * h
    # trainable norm weights, input without grad: the first norm saves its bf16 input + rsqrt (lean) or the
    # bf16 x̂ (HF); the second one, now on the graph, 2·T·h + 4·T (lean) or 4·T·h + 4·T + 2·T·h (HF)
    lean_n = mm.layer_saved_bytes(a, T, False, set(), True, None, True)[0]
    stock_n = mm.layer_saved_bytes(a, T, False, set(), True, None)[0]
    assert stock_n - lean_n == (2 * T * h - (2 * T * h + 4 * T)) + (6 * T * h - 2 * T * h) + 2 * T * i
    # only u on the graph (the lowest layer's up_proj): g alone is saved, the same as silu(g) in HF
    assert (mm.layer_saved_bytes(a, T, False, {"up_proj"}, False, None, True)
            == mm.layer_saved_bytes(a, T, False, {"up_proj"}, False, None))


def test_lean_ops_prediction_llama3_8b():
    kw = dict(seq=1024, ckpt=False, delta=0.01)
    stock = mm.predict_peak(L8B, "misa", lean_ops=False, **kw)
    lean = mm.predict_peak(L8B, "misa", lean_ops=True, **kw)
    assert mm.predict_peak(L8B, "misa", **kw).peak_bytes == lean.peak_bytes  # default = the trainer's
    assert stock.phase == lean.phase == "forward_end"
    T, h, i, L = 1024, 4096, 14336, 32
    # MISA's worst-case draw (one module per layer from layer 0 on, input without grad): layers 1..L-1 are
    # wholly on the graph (layer 0 saves only its down_proj input), each saving 2·T·i in the MLP and 2·T·h
    # per norm; plus the final norm
    assert stock.peak_bytes - lean.peak_bytes == (L - 1) * (2 * T * i + 2 * 2 * T * h) + 2 * T * h
    assert lean.peak_gib < 20.0 < stock.peak_gib
    # with checkpointing the same saving applies to the one recomputed layer (and the final norm) only
    ck = [mm.predict_peak(L8B, "misa", seq=8192, ckpt=True, lean_ops=x).peak_bytes for x in (False, True)]
    assert ck[1] <= ck[0]


# ------------------------------------------------------------------ head / embedding gradient terms
L1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)


def _head_diff(arch, seq, ckpt=True):
    """Points of MISA (one fixed draw) with the head trained minus the same with it frozen."""
    kw = dict(seq=seq, ckpt=ckpt, active=[(3, "down_proj")], lean_ops=False)
    on = mm.predict_peak(arch, "misa", train_head=True, **kw)
    off = mm.predict_peak(arch, "misa", train_head=False, **kw)
    return on, off, {k: on.points[k] - off.points[k] for k in on.points}


def test_head_gradient_terms_untied_hand_computed():
    a = mm.Arch.from_config(L8B)
    V, h = a.vocab_size, a.hidden_size
    Vh = V * h
    T = 8192
    on, off, d = _head_diff(L8B, T)
    state = 12 * Vh  # fp32 master + Adam m, v of the head
    c = (1 << 25) // V
    assert mm.head_fwd_transient(a, T) == 2 * c * V + 2 * Vh
    assert mm.head_bwd_transient(a) == 2 * Vh  # the in-place product's bf16 cast
    assert mm.head_bwd_transient(a, inplace=False) == 6 * Vh  # the earlier out-of-place product
    # forward: the fp32 accumulator is kept; a chunk peaks at g + the V×h product gᵀH_c, not at 8cV
    assert d["forward_end"] == state + 4 * Vh + (2 * c * V + 2 * Vh) - 8 * c * V
    # loss node: accumulator 4Vh, scaled in place, + its bf16 cast 2Vh
    assert d["backward_loss"] == state + 6 * Vh
    # layers: the head's .grad; optimizer step: its grad + its fp32 copy
    assert d["backward_layers"] == state + 2 * Vh
    assert d["optimizer_step"] == state + 2 * Vh + 4 * Vh
    assert on.points["backward_embedding"] == off.points["backward_embedding"] == 0  # embeddings frozen


def test_head_gradient_terms_tied_hand_computed():
    a = mm.Arch.from_config(L1B)
    Vh = a.vocab_size * a.hidden_size
    T, h = 8192, a.hidden_size
    on, off, d = _head_diff(L1B, T)
    state = 12 * Vh  # tied: one matrix, trained through both uses
    assert d["backward_loss"] == state + 6 * Vh
    # the head's gradient waits in the shared matrix's input buffer while the layers run (the old model: 0)
    assert d["backward_layers"] == state + 2 * Vh
    # embedding backward: base + all grads (layer 3's down_proj, the buffered head grad) + its dense V×h
    # gradient + ∂L/∂(embedding output) + CUDA's fp32 partial sums (T > 3072); the sum is in place
    down = 2 * a.module_sizes()["down_proj"]
    base = off.points["optimizer_step"] - down - 4 * a.module_sizes()["down_proj"] + state
    assert on.points["backward_embedding"] == base + down + 2 * Vh + 2 * Vh + 2 * T * h + 4 * T * h
    assert mm.emb_bwd_transient(a, 3072) == 2 * Vh + 2 * 3072 * h  # direct kernel: no partial sums
    assert d["optimizer_step"] == state + 2 * Vh + 4 * Vh


def test_lisa_loss_node_is_4vh_lower_with_the_in_place_product():
    # LISA (embeddings + head + 2 layers) peaked in the loss node's backward with the out-of-place product
    # (10·V·h of head gradient at once, the committed GPU rows); in place that point is 4·V·h lower and
    # nothing else moves
    for arch, seq, ckpt in ((L8B, 1024, False), (L8B, 8192, False), (L1B, 1024, True), (L1B, 8192, True)):
        a = mm.Arch.from_config(arch)
        old = mm.predict_peak(arch, "lisa", seq=seq, ckpt=ckpt, lean_ops=False, inplace_head_grad=False)
        new = mm.predict_peak(arch, "lisa", seq=seq, ckpt=ckpt, lean_ops=False)
        assert old.phase == "backward"
        assert max(old.points, key=old.points.__getitem__) == "backward_loss"
        diff = {k: old.points[k] - new.points[k] for k in old.points}
        assert diff.pop("backward_loss") == 4 * a.vocab_size * a.hidden_size
        assert not any(diff.values())


def _load_residuals():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_residuals.py"
    spec = importlib.util.spec_from_file_location("memory_residuals", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path.parent.parent / "docs" / "results"


def test_model_within_10_percent_of_every_committed_measurement():
    mod, results = _load_residuals()
    rows = mod.residuals(results / f for f in mod.FILES)
    assert len(rows) >= 79
    worst = max(rows, key=lambda r: abs(r["err_pct"]))
    assert abs(worst["err_pct"]) <= 10.0, worst
    lisa = [r for r in rows if r["method"] == "lisa"]
    assert len(lisa) == 12 and max(abs(r["err_pct"]) for r in lisa) < 2.0
    assert mod.main(["--tol", "10"]) == 0


def _cpu_trace():
    """Live CPU bytes over time from the profiler's allocation events (no tensor references taken, so
    autograd's in-place decisions are unchanged); ``mark`` splits the timeline into segments."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile, record_function

    class Trace:
        def __enter__(self):
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
            return self

        def mark(self, label):
            with record_function("MARK::" + label):
                pass

        def __exit__(self, *exc):
            self.prof.__exit__(*exc)
            ev = self.prof.profiler.kineto_results.events()
            mem = sorted((e.start_ns(), e.nbytes()) for e in ev if e.name() == "[memory]")
            marks = sorted((e.start_ns(), e.name()[6:]) for e in ev if e.name().startswith("MARK::"))
            self.seg, live, j = {}, 0, 0
            for t, lab in marks:
                start, peak = live, live
                while j < len(mem) and mem[j][0] <= t:
                    live += mem[j][1]
                    peak = max(peak, live)
                    j += 1
                self.seg[lab] = (start, peak, live)  # live at the segment's start, its peak, at its end
            return False

    return torch, Trace


def test_cpu_tied_head_gradient_mechanism():
    """The mechanism behind the head terms, on a tiny tied Llama on CPU (embedding matrix trains):
    the loss node adds 6·V·h (fp32 product + bf16 cast) over its saved fp32 accumulator; the head's 2·V·h
    gradient then waits through the layers; the embedding backward adds its dense V×h gradient and sums
    in place (no third V×h)."""
    torch, Trace = _cpu_trace()
    transformers = pytest.importorskip("transformers")
    from misa_train.losses import model_loss

    V, h, T = 8192, 64, 32
    cfg = transformers.LlamaConfig(hidden_size=h, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, tie_word_embeddings=True,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.model.embed_tokens.weight
    assert w is model.lm_head.weight
    w.requires_grad_(True)
    a = mm.Arch.from_config(cfg.to_dict())
    Vh = V * h
    ids = torch.randint(0, V, (1, T))
    with Trace() as tr:
        def on_decoder(_m, _i, out):  # fires once the loss node has produced ∂L/∂H
            out.last_hidden_state.register_hook(lambda g: tr.mark("loss_node"))

        def on_embedding(_m, _i, out):  # fires once the layers have produced ∂L/∂(embedding output)
            out.register_hook(lambda g: tr.mark("layers"))

        hooks = [model.model.register_forward_hook(on_decoder),
                 model.model.embed_tokens.register_forward_hook(on_embedding)]
        loss = model_loss(model, {"input_ids": ids})
        tr.mark("forward")
        loss.backward()
        tr.mark("embedding")
        for hk in hooks:
            hk.remove()
    small = 64 * T * h  # activations and ∂L/∂H of this toy model are O(T·h)
    start, peak, end = tr.seg["loss_node"]
    assert abs((peak - start) - mm.head_bwd_transient(a)) <= small, (peak - start) / Vh
    # after the loss node: the accumulator (4Vh) is gone, the head's bf16 gradient (2Vh) stays
    assert abs((end - start) - (2 * Vh - 4 * Vh)) <= small
    start, peak, end = tr.seg["embedding"]
    # the dense V×h gradient, then an in-place sum into the buffered head gradient: +2Vh at most, not +4Vh
    assert abs((peak - start) - 2 * Vh) <= small, (peak - start) / Vh
    assert abs(end - start) <= small
    assert w.grad is not None and tuple(w.grad.shape) == (V, h)


def test_o_proj_input_is_sdpa_output_when_attention_is_on_the_graph():
    """SDPA returns its output laid out (B, S, H, d), so the decoder's transpose copies nothing and o_proj's saved
    input is the storage SDPA saved: counted once when attention is on the graph (x_grad; the CPU census above
    has the case), separately otherwise. ``attn_out_shared=False`` is a backend that returns (B, H, S, d)."""
    a = mm.Arch.from_config(L8B)
    T = 1024
    for x_grad, saving in ((True, 2 * T * a.hq), (False, 0)):
        copy, _ = mm.layer_saved_bytes(a, T, x_grad, {"o_proj"}, False, None, True, attn_out_shared=False)
        shared, _ = mm.layer_saved_bytes(a, T, x_grad, {"o_proj"}, False, None, True, attn_out_shared=True)
        assert copy - shared == saving
    full = {x: mm.predict_peak(L1B, "full", seq=8192, lean_ops=False, attn_out_shared=x).points["forward_end"]
            for x in (False, True)}
    a1 = mm.Arch.from_config(L1B)
    assert full[False] - full[True] == a1.num_hidden_layers * 2 * 8192 * a1.hq


def test_checkpointed_backward_recomputes_the_layer_it_differentiates():
    """Under checkpointing the layer being differentiated holds its own recomputed saved set, while every
    lower layer's input is still held: BAdam's top layer costs more at the layers point than its bottom layer
    by at least the extra the active layer saves (the earlier model charged every layer the largest set)."""
    a = mm.Arch.from_config(L1B)
    T = 8192
    top = a.num_hidden_layers - 1
    pts = {layer: mm.predict_peak(L1B, "badam", seq=T, ckpt=True, lean_ops=False,
                                  active=[(layer, k) for k in mm.KINDS]).points["backward_layers"]
           for layer in (0, top)}
    active, _ = mm.layer_saved_bytes(a, T, True, set(mm.KINDS), False, None, attn_out_shared=True)
    frozen, _ = mm.layer_saved_bytes(a, T, True, set(), False, None, attn_out_shared=True)
    assert pts[top] - pts[0] >= active - frozen > 0
