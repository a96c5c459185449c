r"""Predicted peak GPU memory of one training step of a Llama-style decoder, per fine-tuning method.

Pure Python (no torch): the numbers are an account of what PyTorch's autograd and the MISA trainer
(misa_train.methods / optim.ActiveAdamW / losses.chunked_causal_lm_loss) keep alive, so the prediction can
be checked on paper and compared with ``torch.cuda.max_memory_allocated`` (see benchmarks/bench_gpu.py and
docs/results.md for the residuals). All sizes are bytes; ``T = batch · seq`` tokens.

Notation: hidden h, MLP width i, query width h_q = n_heads · d, key/value width h_kv = n_kv_heads · d
(d = h / n_heads), vocabulary V, L layers. A "module" is one of q, k, v, o, gate, up, down of a layer.

Assumptions (each one checked against a saved-tensor census of the Hugging Face Llama on CPU, see
tests/test_memory_model.py, or against the GPU measurements):

* Weights are bf16 (2 B/parameter); LoRA adapters are fp32 (peft's ``autocast_adapter_dtype``), 4 B.
* Optimizer (ActiveAdamW): an active bf16 parameter holds an fp32 master (4 B) and fp32 m, v (8 B) = 12 B;
  an active fp32 parameter holds m, v = 8 B. Gradients live in the parameter dtype (2 B or 4 B).
  Inside ``step`` either the fp32 copies of the bf16 gradients or the fp32 ``sqrt(v)`` denominator
  exist (never both: the copies are deleted first): +4 B per active parameter at the step peak.
* Autograd saves a linear layer's *input* only when its weight requires grad, and its weight (no new
  memory) only when its input requires grad; a frozen linear therefore costs no activation memory.
* One decoder layer whose input requires grad saves (bytes):
  RMSNorm ×2: fp32 copy of its input, 4·T·h each (+4·T for rsqrt; +2·T·h bf16 if the norm weight trains);
  SDPA (flash, is_causal, GQA without repeat_kv): q, out 2·T·h_q each, k, v 2·T·h_kv each, logsumexp 4·T·n_heads;
  SwiGLU: gate output, silu(gate output), up output: 3 · 2·T·i.
  A trainable q/k/v (shared input), o, gate/up (shared input), down adds its bf16 input: 2·T·h, 2·T·h_q,
  2·T·h, 2·T·i. A LoRA adapter adds the fp32 cast of its input (peft casts per adapter; 4·T·in) and
  lora_A's output 4·T·r.
* With ``lean_ops`` (misa_train.lean_ops, the trainer's default) the two blocks save what their backward
  needs and no more: SwiGLU saves g and u, 2 · 2·T·i instead of 3 (silu(g) is recomputed; u only when g
  needs a gradient, g whenever g or u does); each RMSNorm (the final one too) saves its bf16 input,
  2·T·h + 4·T for rsqrt, instead of the fp32 copy 4·T·h + 4·T, whether the input or the weight (or both)
  needs a gradient (no extra 2·T·h for a trainable weight: x̂ is recomputed). Its backward works in fp32
  on row chunks of ≤ 4M elements, so the backward transient below is unchanged.
* Which layers are on the autograd graph: a layer is, iff its input requires grad or it holds a trainable
  parameter; the input requires grad iff something below trains (embeddings included) or the trainer
  calls ``enable_input_require_grads`` (misa_train does that whenever gradient checkpointing is on and the
  embeddings are frozen). So MISA's modules, spread over all layers, put every layer above the lowest
  active one on the graph; BAdam's one layer without checkpointing lets backward stop below it.
* Inside the lowest layer on the graph only what depends on a trainable weight is saved (e.g. an active
  down_proj alone saves only its input), the same dataflow rule as above.
* Checkpointing (non-reentrant, per decoder layer): each layer on the graph keeps only its input 2·T·h;
  backward recomputes one layer at a time, so one layer's saved set exists at once.
* Backward transient of one layer (gradients of the SwiGLU intermediates and of the residual stream):
  ``6·T·i + 4·T·h`` bytes, the one constant here that is not a tensor census (calibrated globally on the
  bench grid, never per row).
* Loss: chunked CE keeps ∂L/∂hidden (2·T·h) from forward to backward, the final hidden (2·T·h), the final
  norm's fp32 input (4·T·h), and while a chunk of c rows is processed about 8·c·V bytes (bf16 logits,
  fp32 logits turned in place into ∂ℓ/∂z, its bf16 cast). The HF loss (unchunked) holds bf16 logits 2·T·V,
  the fp32 log-softmax 4·T·V and its transient fp32 upcast 4·T·V in forward; in backward two more fp32
  T·V buffers (14·T·V in all).
* Head/embedding gradients (whenever the head matrix requires grad: a trainable untied head, or a tied
  matrix trained as embeddings or head; all V×h, weight dtype 2 B unless said):
  forward: the chunked loss's fp32 accumulator of ∂L/∂W (4·V·h, kept until backward) and, per chunk, the
  product gᵀ·H_c added into it (2·V·h, with g 2·c·V): ``head_fwd_transient``;
  loss node in backward: ``grad_w.mul_(grad_out).to(bf16)`` scales the saved accumulator in place and
  casts it (2·V·h), 6·V·h at once: ``head_bwd_transient``; an out-of-place product
  (``inplace_head_grad=False``: the bench rows in docs/results without that flag) makes a new fp32 V×h
  (4·V·h) first, 10·V·h at once;
  rest of backward: the head's gradient (2·V·h) exists throughout: untied as the head's ``.grad``, tied in
  autograd's input buffer of the shared matrix, waiting for the embedding's gradient;
  embedding backward (when the embedding matrix requires grad): the dense V×h gradient (2·V·h) next to
  the incoming 2·T·h (+ 4·T·h fp32 partial sums on CUDA above 3072 indices); a tied matrix's two
  gradients are summed in place, and AccumulateGrad takes the sum as ``.grad``: ``emb_bwd_transient``.
* Peak = max of three phases: end of forward (everything saved + loss buffers), backward (the max of three
  points: the loss node; walking the layers top-down: saved activations of the layers not yet processed
  + gradients produced so far + one layer's transient; the embedding backward), and the optimizer step
  (all gradients + the step's +4 B/parameter). ``Estimate.points`` has each point.
* Not counted: CUDA context/cuBLAS workspaces (not in ``max_memory_allocated``), RoPE cos/sin tables,
  attention-mask buffers (none with is_causal), the sampler's O(modules) vectors, allocator rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GIB = float(2**30)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "lisa", "badam", "misa")
# backward transient of one layer: c_i · T·i + c_h · T·h bytes (see the module docstring)
BWD_TRANSIENT_I = 6.0
BWD_TRANSIENT_H = 4.0
CE_CHUNK_ELEMS = 1 << 25  # must match misa_train.losses._CHUNK_ELEMS
EMB_BWD_DIRECT_MAX = 3072  # CUDA embedding_dense_backward: above this many indices, the sorted path




@dataclass(frozen=True)
class Arch:
    """The shape numbers of a Llama-style decoder (HF LlamaConfig field names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> Arch:
        """Build from a dict or any object with LlamaConfig attributes."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(int(get("hidden_size")), int(get("intermediate_size")), int(get("num_hidden_layers")),
                   int(get("num_attention_heads")),
                   int(get("num_key_value_heads") or get("num_attention_heads")),
                   int(get("vocab_size")), bool(get("tie_word_embeddings", False)),
                   get("head_dim", None))

    @property
    def d(self) -> int:
        return int(self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def hq(self) -> int:
        return self.num_attention_heads * self.d

    @property
    def hkv(self) -> int:
        return self.num_key_value_heads * self.d

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each module kind."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.hq), "k_proj": (h, self.hkv), "v_proj": (h, self.hkv),
                "o_proj": (self.hq, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def module_sizes(self) -> dict[str, int]:
        return {k: a * b for k, (a, b) in self.module_shapes().items()}

    def layer_params(self) -> int:
        """Matrices + the two norm vectors of one decoder layer."""
        return sum(self.module_sizes().values()) + 2 * self.hidden_size

    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Parameters of an untied LM head (0 when tied)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        """All distinct parameters (tied head once): embeddings + L layers + final norm + head."""
        return (self.embed_params() + self.num_hidden_layers * self.layer_params() + self.hidden_size
                + self.head_params())


@dataclass
class Estimate:
    """Predicted peak and its itemisation at the peak point (bytes)."""

    peak_bytes: int
    phase: str                        # "forward_end" | "backward" | "optimizer_step"
    breakdown: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # every candidate phase's total
    # the finer points behind the phases: forward_end, backward_loss (the loss node), backward_layers (the
    # worst layer of the top-down walk), backward_embedding (the embedding's backward; 0 when it does not
    # run), optimizer_step; "backward" = the max of the three backward points
    points: dict[str, int] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def head_fwd_transient(a: Arch, T: int) -> int:
    """Bytes of the chunked loss's forward transient for one chunk when the head matrix trains.

    ``_ChunkedLinearCE.forward`` adds ``gᵀ·H_c`` to its fp32 accumulator chunk by chunk; the product is a
    fresh V×h tensor in the weight dtype (2·V·h) that exists together with the chunk's bf16 ∂ℓ/∂z
    ``g`` (2·c·V), c = rows per chunk. (The fp32 accumulator itself, 4·V·h, is counted as kept.)
    """
    c = min(max(64, CE_CHUNK_ELEMS // a.vocab_size), T)
    return 2 * c * a.vocab_size + 2 * a.vocab_size * a.hidden_size


def head_bwd_transient(a: Arch, inplace: bool = True) -> int:
    """Bytes the loss node's backward allocates for ∂L/∂W_head on top of its saved fp32 accumulator (4·V·h).

    ``grad_w.mul_(grad_out).to(weight dtype)``: the cast, a V×h tensor in the weight dtype (2·V·h).
    ``inplace=False``: the out-of-place ``(grad_w * grad_out).to(...)`` makes a new fp32 V×h tensor (4·V·h)
    before the cast, 6·V·h (the bench rows in docs/results recorded without ``inplace_head_grad`` ran it).
    """
    return (2 if inplace else 6) * a.vocab_size * a.hidden_size


def emb_bwd_transient(a: Arch, T: int) -> int:
    """Bytes live during the embedding's backward besides parameter gradients already produced.

    ``embedding_dense_backward`` allocates the dense V×h gradient in the weight dtype (2·V·h) while the
    incoming ∂L/∂(embedding output) (2·T·h) is alive; on CUDA, above ``EMB_BWD_DIRECT_MAX`` indices the
    sorted kernel also holds fp32 per-index partial sums (4·T·h). A tied matrix's buffered head gradient
    is then summed into in place (autograd's input buffer owns it), so no third V×h tensor appears.
    """
    h = a.hidden_size
    return 2 * a.vocab_size * h + 2 * T * h + (4 * T * h if T > EMB_BWD_DIRECT_MAX else 0)


def _norm_saved(T: int, h: int, x_grad: bool, w_grad: bool, lean_ops: bool) -> int:
    """Bytes one RMSNorm saves: HF fp32 input copy 4·T·h + rsqrt 4·T (+ bf16 x̂ 2·T·h for a trainable weight);
    lean: bf16 input 2·T·h + rsqrt 4·T when anything needs a gradient."""
    if lean_ops:
        return 2 * T * h + 4 * T if (x_grad or w_grad) else 0
    return (4 * T * h + 4 * T if x_grad else 0) + (2 * T * h if w_grad else 0)


def layer_saved_bytes(a: Arch, T: int, x_grad: bool, trainable: set[str], norms: bool,
                      lora_r: int | None, lean_ops: bool = False, attn_out_shared: bool = False) -> tuple[int, bool]:
    """Bytes autograd saves in one decoder layer, and whether its output requires grad.

    The per-layer rule of the module docstring, checked against a census of the Hugging Face Llama
    (tests/test_memory_model.py).

    Args:
        a: the architecture. T: tokens per step (batch · seq).
        x_grad: the layer's input requires grad.
        trainable: module kinds whose base weight trains. norms: the RMSNorm weights train.
        lora_r: LoRA rank on every kind (adapters train), or None.
        lean_ops: misa_train.lean_ops patched in (SwiGLU saves g, u; RMSNorm its bf16 input).
        attn_out_shared: o_proj's saved input is the storage SDPA saved as its output (see predict_peak).

    Returns:
        (bytes saved for backward, whether the layer's output requires grad).
    """
    h, i, hq, hkv, nh = a.hidden_size, a.intermediate_size, a.hq, a.hkv, a.num_attention_heads
    lora = lora_r is not None
    r = lora_r or 0
    b = 0
    # attention block
    b += _norm_saved(T, h, x_grad, norms, lean_ops)
    n_grad = x_grad or norms
    qkv_tr = [k for k in ("q_proj", "k_proj", "v_proj") if k in trainable]
    if qkv_tr:
        b += 2 * T * h
    if lora:
        b += 3 * (4 * T * h + 4 * T * r)
    attn_grad = n_grad or bool(qkv_tr) or lora
    if attn_grad:
        b += 2 * T * hq * 2 + 2 * T * hkv * 2 + 4 * T * nh
    if "o_proj" in trainable and not (attn_grad and attn_out_shared):  # else it is SDPA's saved output
        b += 2 * T * hq
    if lora:
        b += 4 * T * hq + 4 * T * r
    h1_grad = x_grad or attn_grad or "o_proj" in trainable or lora
    # MLP block
    b += _norm_saved(T, h, h1_grad, norms, lean_ops)
    m_grad = h1_grad or norms
    if "gate_proj" in trainable or "up_proj" in trainable:
        b += 2 * T * h
    if lora:
        b += 2 * (4 * T * h + 4 * T * r)
    g_grad = m_grad or "gate_proj" in trainable or lora
    u_grad = m_grad or "up_proj" in trainable or lora
    if lean_ops:
        if g_grad or u_grad:
            b += 2 * T * i      # g (silu(g) and its derivative are recomputed from it)
        if g_grad:
            b += 2 * T * i      # u, for dg
    else:
        if g_grad:
            b += 2 * T * i      # silu saves its input
        if u_grad:
            b += 2 * T * i      # the product saves silu(g)
        if g_grad:
            b += 2 * T * i      # ... and u
    if "down_proj" in trainable:
        b += 2 * T * i
    if lora:
        b += 4 * T * i + 4 * T * r
    out_grad = h1_grad or g_grad or u_grad or "down_proj" in trainable or lora
    return b, out_grad


def _lora_layer_params(a: Arch, r: int) -> int:
    return sum(r * (fi + fo) for fi, fo in a.module_shapes().values())


def method_plan(a: Arch, method: str, *, delta: float = 0.01, lisa_layers: int = 2, badam_layers: int = 1,
                active: Iterable[tuple[int, str]] | None = None, train_embeddings: bool | None = None,
                train_head: bool | None = None) -> dict[str, Any]:
    """What trains: per-layer trainable kinds, embeddings/head/norm flags, active bf16 parameter count.

    ``active``: explicit (layer, kind) pairs for misa/lisa/badam (e.g. a draw the bench recorded). Without
    it the worst case for memory is assumed: misa fills ``floor(δ·P)`` with modules in the order
    down, gate, up, q, o, k, v of layers 0, 1, 2, ... (so backward runs through every layer); lisa/badam
    take layers 0..k-1. lisa trains embeddings and head by default (the bench's LISA), others do not.
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; expected one of {METHODS}")
    L = a.num_hidden_layers
    per_layer: list[set[str]] = [set() for _ in range(L)]
    emb = bool(train_embeddings) if train_embeddings is not None else method in ("lisa", "full")
    head = bool(train_head) if train_head is not None else method in ("lisa", "full")
    norms = method == "full"
    if method == "full":
        per_layer = [set(KINDS) for _ in range(L)]
    elif method in ("misa", "lisa", "badam"):
        if active is not None:
            for layer, kind in active:
                per_layer[int(layer)].add(kind)
        elif method == "misa":
            budget = math.floor(delta * a.total_params())
            sizes = a.module_sizes()
            order = ("down_proj", "gate_proj", "up_proj", "q_proj", "o_proj", "k_proj", "v_proj")
            used = 0
            for layer in range(L):
                placed = False
                for k in order:
                    if used + sizes[k] <= budget:
                        per_layer[layer].add(k)
                        used += sizes[k]
                        placed = True
                        break
                if not placed:
                    break
        else:
            k = lisa_layers if method == "lisa" else badam_layers
            for layer in range(min(k, L)):
                per_layer[layer] = set(KINDS)
    sizes = a.module_sizes()
    layer_active = [sum(sizes[k] for k in s) for s in per_layer]
    if norms:
        layer_active = [n + 2 * a.hidden_size for n in layer_active]
    head_n = 0
    if head:
        head_n = a.head_params()  # tied: the head is the embedding matrix, counted there
    emb_n = a.embed_params() if (emb or (head and a.tie_word_embeddings)) else 0
    final_norm = a.hidden_size if norms else 0
    return {"per_layer": per_layer, "layer_active": layer_active, "emb": emb_n > 0, "emb_n": emb_n,
            "head_n": head_n, "head_trains": head, "norms": norms, "final_norm_n": final_norm,
            "n_active": sum(layer_active) + emb_n + head_n + final_norm}


@dataclass(frozen=True)
class _Persistent:
    """Bytes that live through the whole step: weights, fp32 masters, Adam moments; and the gradients."""

    weights: int
    masters: int
    moments: int
    layer_grads: list[int]            # gradient bytes of each layer's trainable parameters
    grads_total: int                  # every trainable parameter's gradient (layers, embeddings, head, norm)
    n_optimised: int                  # parameters the optimizer steps (bf16 actives + LoRA adapters)

    @property
    def base(self) -> int:
        return self.weights + self.masters + self.moments


@dataclass(frozen=True)
class _Activations:
    """Per layer: saved bytes, bytes kept to backward (all, or the input under checkpointing), on the graph."""

    saved: list[int]
    kept: list[int]
    on_graph: list[bool]
    top_grad: bool                    # the last layer's output requires grad
    transient: int                    # one layer's backward transient


@dataclass(frozen=True)
class _Loss:
    """The loss path: final norm + hidden, the loss's forward peak and its backward node, head gradient."""

    final: int
    forward_peak: int
    backward_node: int
    head_grad: bool


def _persistent_bytes(a: Arch, plan: dict[str, Any], lora_n_layer: int) -> _Persistent:
    """bf16 weights (2 B) + fp32 LoRA adapters (4 B); 4 B masters and 8 B moments per active parameter."""
    L = a.num_hidden_layers
    lora_n = L * lora_n_layer
    n_bf16 = plan["n_active"]
    layer_grads = [4 * lora_n_layer] * L if lora_n else [2 * n for n in plan["layer_active"]]
    # the head's gradient is separate only when untied: a tied matrix's one gradient is the embedding's
    total = sum(layer_grads) + 2 * plan["emb_n"] + 2 * plan["head_n"] + 2 * plan["final_norm_n"]
    return _Persistent(weights=2 * a.total_params() + 4 * lora_n, masters=4 * n_bf16, moments=8 * (n_bf16 + lora_n),
                       layer_grads=layer_grads, grads_total=total, n_optimised=n_bf16 + lora_n)


def _activation_bytes(a: Arch, plan: dict[str, Any], T: int, input_grads: bool, ckpt: bool,
                      lora_r: int | None, lean_ops: bool, attn_out_shared: bool) -> _Activations:
    """Walk the layers bottom-up: what each saves (:func:`layer_saved_bytes`) and whether it is on the graph.

    With checkpointing only each on-graph layer's input (2·T·h) is kept; backward recomputes one layer at a
    time, and the layer being differentiated holds its own saved set.
    """
    saved, on_graph = [], []
    x_grad = input_grads
    for trainable in plan["per_layer"]:
        b, out_grad = layer_saved_bytes(a, T, x_grad, trainable, plan["norms"], lora_r, lean_ops, attn_out_shared)
        on_graph.append(x_grad or b > 0)
        saved.append(b)
        x_grad = out_grad
    kept = [2 * T * a.hidden_size if g else 0 for g in on_graph] if ckpt else saved
    transient = int(BWD_TRANSIENT_I * T * a.intermediate_size + BWD_TRANSIENT_H * T * a.hidden_size)
    return _Activations(saved, kept, on_graph, x_grad, transient)


def _loss_bytes(a: Arch, plan: dict[str, Any], T: int, top_grad: bool, chunked_ce: bool, lean_ops: bool,
                inplace_head_grad: bool) -> _Loss:
    """The loss path's bytes (module docstring, "Loss" and "Head/embedding gradients").

    ∂L/∂W of the head is computed whenever the head matrix requires grad: an untied trainable head, or a
    tied matrix trained as embeddings and/or head.
    """
    h, V = a.hidden_size, a.vocab_size
    Vh = V * h
    head_grad = plan["head_trains"] or (a.tie_word_embeddings and plan["emb"])
    final = _norm_saved(T, h, top_grad, False, lean_ops) + 2 * T * h   # final norm's saved input, final hidden
    if not chunked_ce:
        return _Loss(final, 10 * T * V, 14 * T * V + 2 * T * h + (2 * Vh if head_grad else 0), head_grad)
    c = min(max(64, CE_CHUNK_ELEMS // V), T)
    keep = (2 * T * h if top_grad else 0) + (4 * Vh if head_grad else 0)
    chunk = 8 * c * V                 # fp32 logits + logsumexp's fp32 (z - max)
    if head_grad:
        chunk = max(chunk, head_fwd_transient(a, T))   # bf16 g and the V×h product gᵀ·H_c
    node = keep + 2 * T * h + (head_bwd_transient(a, inplace_head_grad) if head_grad else 0)
    return _Loss(final, keep + chunk, node, head_grad)


def _backward_peak(a: Arch, plan: dict[str, Any], T: int, ckpt: bool, pers: _Persistent, acts: _Activations,
                   loss: _Loss) -> tuple[int, int, int]:
    """Bytes at the three backward points: the loss node, the worst layer of the top-down walk, the embedding.

    At layer l the layers below still hold what they kept; the gradients produced so far (the head's from the
    loss node on: untied as its ``.grad``, tied in autograd's input buffer of the shared matrix) add up.
    """
    h = a.hidden_size
    kept_total = sum(acts.kept)
    # as at the forward end, with the loss node (and 2·T·h) in place of the final hidden/norm and loss buffers
    at_loss = pers.base + kept_total + loss.backward_node + 2 * T * h
    below = kept_total
    grads = 2 * a.vocab_size * h if loss.head_grad else 0
    worst_layer = 0
    for layer in reversed(range(a.num_hidden_layers)):
        if not acts.on_graph[layer]:
            continue
        below -= acts.kept[layer]
        own = acts.kept[layer] + acts.saved[layer] if ckpt else acts.saved[layer]
        here = pers.base + below + own + grads + pers.layer_grads[layer] + acts.transient + 2 * T * h
        worst_layer = max(worst_layer, here)
        grads += pers.layer_grads[layer]
    at_embedding = (pers.base + grads + emb_bwd_transient(a, T)) if plan["emb"] else 0
    return at_loss, worst_layer, at_embedding


def predict_peak(arch: Mapping[str, Any] | Arch, method: str, *, seq: int, batch: int = 1,
                 ckpt: bool = False, delta: float = 0.01, lisa_layers: int = 2, badam_layers: int = 1,
                 lora_r: int = 16, chunked_ce: bool = True, active: Iterable[tuple[int, str]] | None = None,
                 train_embeddings: bool | None = None, train_head: bool | None = None,
                 input_grads: bool | None = None, lean_ops: bool = True,
                 inplace_head_grad: bool = True, attn_out_shared: bool = True) -> Estimate:
    """Peak bytes of one training step (see the module docstring for every assumption).

    Args:
        arch: HF-style config (dict or Arch). method: full | lora | lisa | badam | misa.
        seq, batch: tokens per step T = seq·batch. ckpt: per-layer activation checkpointing.
        delta: MISA budget fraction of all parameters. lisa_layers/badam_layers: layers per period.
        lora_r: LoRA rank (adapters on all seven kinds). chunked_ce: chunked loss vs. HF full logits.
        active: explicit (layer, kind) draw for sampled methods (default: the worst case, see method_plan).
        input_grads: whether the embedding output requires grad; default = what misa_train does
            (embeddings train, or checkpointing with frozen embeddings).
        lean_ops: misa_train.lean_ops patched in (TrainConfig.lean_ops, default True): SwiGLU saves 2 instead
            of 3 (T × i) bf16 tensors, each RMSNorm its bf16 input (2 B/element) instead of an fp32 copy
            (4 B/element). False = the stock Hugging Face modules.
        inplace_head_grad: the chunked loss scales its saved head gradient in place in backward, as the
            trainer does; False models the out-of-place product (4·V·h more at the loss node) that the bench
            rows recorded without this flag ran with (misa_train.bench_grid.predict_kwargs).
        attn_out_shared: SDPA returns the attention output in (B, S, H, d) layout, so the decoder's
            ``transpose(1, 2).contiguous()`` copies nothing and o_proj's saved input *is* SDPA's saved output
            (2·T·h_q per layer where o_proj trains and attention is on the graph, counted once). Measured:
            CUDA (H100 census) and CPU (tests/test_memory_model.py census, torch 2.13). False for a backend
            that returns (B, H, S, d), where that transpose makes a copy.
    Returns an Estimate: peak bytes, the phase it occurs in, the itemisation at that point.
    """
    a = arch if isinstance(arch, Arch) else Arch.from_config(arch)
    if seq < 2 or batch < 1:
        raise ValueError("seq must be >= 2 and batch >= 1")
    T = seq * batch
    plan = method_plan(a, method, delta=delta, lisa_layers=lisa_layers, badam_layers=badam_layers,
                       active=active, train_embeddings=train_embeddings, train_head=train_head)
    if input_grads is None:
        input_grads = plan["emb"] or ckpt
    pers = _persistent_bytes(a, plan, _lora_layer_params(a, lora_r) if method == "lora" else 0)
    acts = _activation_bytes(a, plan, T, bool(input_grads), ckpt, lora_r if method == "lora" else None, lean_ops,
                             attn_out_shared)
    loss = _loss_bytes(a, plan, T, acts.top_grad, chunked_ce, lean_ops, inplace_head_grad)
    fwd_end = pers.base + sum(acts.kept) + loss.final + loss.forward_peak
    bwd_loss, bwd_layers, bwd_emb = _backward_peak(a, plan, T, ckpt, pers, acts, loss)
    step = pers.base + pers.grads_total + 4 * pers.n_optimised
    phases = {"forward_end": int(fwd_end), "backward": int(max(bwd_loss, bwd_layers, bwd_emb)),
              "optimizer_step": int(step)}
    points = {"forward_end": int(fwd_end), "backward_loss": int(bwd_loss), "backward_layers": int(bwd_layers),
              "backward_embedding": int(bwd_emb), "optimizer_step": int(step)}
    phase = max(phases, key=phases.__getitem__)
    breakdown = {"weights_bf16": pers.weights, "fp32_masters": pers.masters, "adam_moments": pers.moments}
    if phase == "optimizer_step":
        breakdown.update(gradients=pers.grads_total, step_fp32_temporaries=4 * pers.n_optimised)
    elif phase == "forward_end":
        breakdown.update(saved_activations=sum(acts.kept), final_hidden_and_norm=loss.final,
                         loss_buffers=loss.forward_peak)
    else:
        breakdown.update(activations_and_backward=phases["backward"] - pers.base)
    return Estimate(phases[phase], phase, {k: int(v) for k, v in breakdown.items()}, phases, points)


def flops_per_token(arch: Mapping[str, Any] | Arch, method: str, *, seq: int, delta: float = 0.01,
                    lisa_layers: int = 2, badam_layers: int = 1, lora_r: int = 16,
                    active: Iterable[tuple[int, str]] | None = None, lowest_graph_layer: int = 0) -> float:
    """Model FLOPs per trained token of one forward+backward (recomputation not counted: MFU, not HFU).

    forward  = 2·(matrices of all layers + head) + 2·L·seq·h_q      (causal attention, QKᵀ and AV halved)
    backward = input-gradients through the layers on the graph (2·their matrices + 2× their attention)
               + 2·head (∂L/∂hidden) + weight-gradients 2·(active matrices)
    For full fine-tuning this is the usual 6·N (+ attention) per token; for LoRA the weight-gradient
    term is the adapters' (and their forward). ``lowest_graph_layer``: first layer backward reaches.
    """
    a = arch if isinstance(arch, Arch) else Arch.from_config(arch)
    L = a.num_hidden_layers
    mats = sum(a.module_sizes().values())
    head = a.vocab_size * a.hidden_size
    attn = 2 * seq * a.hq  # per layer per token, causal
    fwd = 2 * (L * mats + head) + L * attn
    on = L - lowest_graph_layer
    bwd_in = 2 * (on * mats) + 2 * head + 2 * on * attn
    plan = method_plan(a, method, delta=delta, lisa_layers=lisa_layers, badam_layers=badam_layers,
                       active=active)
    if method == "lora":
        lp = L * _lora_layer_params(a, lora_r)
        return float(fwd + bwd_in + 2 * lp + 2 * lp + 2 * lp)
    w = sum(plan["layer_active"]) + plan["head_n"] + (head if plan["emb"] and a.tie_word_embeddings else 0)
    return float(fwd + bwd_in + 2 * w)
