"""Causal-LM cross-entropy computed in chunks over the tokens, so the full fp32 logits never exist.

For a model with hidden states ``H ∈ R^{N×h}`` (N = batch·seq tokens), an LM head ``W ∈ R^{V×h}`` and labels
``y``, the usual loss path materialises ``Z = H Wᵀ`` in bf16 (``2NV`` bytes), an fp32 upcast (``4NV``), the
fp32 log-softmax saved for backward (``4NV``) and, in backward, an fp32 gradient of the same size. For
Llama-3 (V = 128 256) at N = 8192 that is ~12 GiB, close to the bf16 weights of an 8B model.

:func:`chunked_causal_lm_loss` instead walks the tokens in chunks of ``c`` rows and, per chunk, computes

    z = H_c Wᵀ (bf16 matmul, fp32 result)      lse = logsumexp(z)      ℓ_i = lse_i − z_{i,y_i}
    ∂ℓ/∂z = softmax(z) − onehot(y)               (scaled by 1/n_valid: the loss is a mean)
    ∂L/∂H_c = (∂ℓ/∂z) W       ∂L/∂W += (∂ℓ/∂z)ᵀ H_c   (fp32 accumulation, only if W requires grad)

already in the forward pass (the gradient is needed anyway and this avoids a second head matmul), keeping
only ``∂L/∂H`` (``N·h`` in the hidden dtype) and, when the head trains, ``∂L/∂W`` until backward, which
multiplies them by the incoming scalar gradient. Working memory is ``O(c·V)`` instead of ``O(N·V)``.

Semantics match Hugging Face's ``ForCausalLMLoss`` for a bias-free, un-soft-capped head: position t predicts
label t+1, ``ignore_index`` labels are skipped, the loss is the mean over the non-ignored targets (NaN when
there are none, as ``F.cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from misa_train.config import ConfigError

# Which implementation computes the loss: "chunked" (this module), "torch" (torch.nn.functional's
# linear_cross_entropy, chunked by torch itself) or "auto" (torch's where it saves memory: the installed torch
# has it and the head trains; on an H200 that saved 1.9 GiB at Llama-3-8B's head, while with a frozen head
# chunked was 1.8x faster for 130 MiB more; docs/results.md "Loss backends").
BACKENDS = ("chunked", "torch", "auto")
_default_backend = "chunked"

# On a GPU one chunk of fp32 logits holds about 2^25 numbers (128 MiB): small next to an 8B model's weights,
# large enough that the head matmul of one chunk still runs near peak (>= ~256 rows for V = 128k). On a CPU
# there is no launch overhead to amortise and the ~12·chunk·V bytes of temporaries are resident memory, so
# chunks are 8x smaller there (measured: SmolLM2, 1,024 tokens, the loss's transient drops ~0.35 GB).
_CHUNK_ELEMS = {"cuda": 1 << 25, "cpu": 1 << 22}


def default_chunk_tokens(vocab_size: int, device_type: str = "cuda") -> int:
    """Rows per chunk: ``max(64, E // V)`` with E = 2^25 on accelerators, 2^22 on CPU (fp32 logits per chunk)."""
    elems = _CHUNK_ELEMS["cpu"] if device_type == "cpu" else _CHUNK_ELEMS["cuda"]
    return max(64, elems // max(int(vocab_size), 1))


class _ChunkedLinearCE(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (already shifted, flat)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                ignore_index: int, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        valid = targets != ignore_index
        n_valid = valid.sum()
        # one host sync per loss is avoided: the 1/n scale stays a device tensor
        inv_n = 1.0 / n_valid.to(torch.float32)
        want_h = hidden.requires_grad
        want_w = weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h_c = hidden[s:e]
            y_c = targets[s:e]
            v_c = valid[s:e]
            z = (h_c @ weight.t()).float()
            lse = torch.logsumexp(z, dim=-1)
            y_safe = torch.where(v_c, y_c, torch.zeros_like(y_c))
            picked = z.gather(1, y_safe.unsqueeze(1)).squeeze(1)
            total += torch.where(v_c, lse - picked, torch.zeros_like(lse)).sum()
            if want_h or want_w:
                # z becomes ∂ℓ/∂z in place: softmax − onehot, zero on ignored rows, scaled by 1/n_valid
                z.sub_(lse.unsqueeze(1)).exp_()
                z.scatter_add_(1, y_safe.unsqueeze(1), -v_c.to(z.dtype).unsqueeze(1))
                z.mul_((v_c.to(z.dtype) * inv_n).unsqueeze(1))
                g = z.to(hidden.dtype)
                del z
                if want_h:
                    grad_h[s:e] = g @ weight
                if want_w:
                    # each chunk's product is rounded once to the weight dtype, the sum over chunks is fp32
                    grad_w.add_(g.t() @ h_c)
                del g
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.w_dtype = weight.dtype
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if getattr(ctx, "used", False):
            raise RuntimeError("the chunked loss supports one backward pass (no retain_graph): its saved "
                               "head gradient is scaled in place")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        # in place: an out-of-place product would be a second fp32 V×h tensor next to the saved one (4·V·h,
        # 1-2 GiB on Llama-3 vocabularies); that made the loss node the step peak of the measured LISA/full runs
        gw = None if grad_w is None else grad_w.mul_(grad_out).to(ctx.w_dtype)
        return gh, gw, None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           ignore_index: int = -100, chunk_tokens: int | None = None) -> torch.Tensor:
    """Causal-LM loss ``mean_t CE(softmax(h_t Wᵀ), labels_{t+1})`` without materialising all logits.

    Args:
        hidden: final hidden states (after the final norm), shape (B, S, h), any float dtype.
        weight: LM-head matrix W, shape (V, h), same dtype as ``hidden`` (no bias, no soft-capping).
        labels: int64 (B, S); position t of ``hidden`` is scored against ``labels[:, t+1]``;
            ``ignore_index`` entries do not count.
        chunk_tokens: rows per chunk; default :func:`default_chunk_tokens` (V).

    Returns the fp32 scalar mean over non-ignored targets. Gradients flow to ``hidden`` and ``weight``
    (whichever require grad); peak extra memory is ``≈ 12·chunk·V`` bytes plus ``∂L/∂hidden``
    (and ``4·V·h`` for ``∂L/∂W`` when the head trains).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, S, h) and labels (B, S); got {tuple(hidden.shape)}, "
                         f"{tuple(labels.shape)}")
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    chunk = int(chunk_tokens) if chunk_tokens else default_chunk_tokens(weight.shape[0], hidden.device.type)
    return _ChunkedLinearCE.apply(h, weight, y, int(ignore_index), chunk)


def has_torch_linear_ce() -> bool:
    """Whether the installed torch has ``F.linear_cross_entropy`` with chunking options."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def set_default_backend(name: str) -> None:
    """Choose the loss implementation for calls that do not name one (``TrainConfig.loss_backend``).

    Raises ConfigError for an unknown name, or for "torch" when the installed torch lacks it."""
    global _default_backend
    if name not in BACKENDS:
        raise ConfigError(f"loss_backend: unknown {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "torch" and not has_torch_linear_ce():
        raise ConfigError(f"loss_backend: torch {torch.__version__} has no F.linear_cross_entropy; use chunked")
    _default_backend = name


def torch_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, acc_policy: str = "auto",
                         fp32_mean: bool = True) -> torch.Tensor:
    """:func:`chunked_causal_lm_loss` computed by torch's ``F.linear_cross_entropy`` with its chunked path
    (``LinearCrossEntropyOptions(acc_policy=...)``; "auto" lets torch pick chunking and accumulation per
    device and dtype). Returns L = (1/N) Σ_t ℓ_t over the N non-ignored targets, as fp32.

    ``fp32_mean`` (default): torch returns the per-token losses ℓ_t (``reduction="none"``) and the mean is
    taken here in fp32. With ``fp32_mean=False`` torch's own mean is returned; for bf16 inputs torch 2.13
    accumulates it in bf16 across chunks, which on an H200 put the loss 2e-3 to 6.6e-2 off (10.56 for 11.31
    at V = 49152, S = 8192; docs/results.md "Loss backends"). Gradients are the same either way."""
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    options = torch.nn.LinearCrossEntropyOptions(acc_policy=acc_policy)
    if not fp32_mean:
        return F.linear_cross_entropy(h, weight, y, ignore_index=ignore_index, options=options).float()
    per_token = F.linear_cross_entropy(h, weight, y, ignore_index=ignore_index, options=options, reduction="none")
    return per_token.float().sum() / (y != ignore_index).sum()


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   ignore_index: int = -100, backend: str | None = None) -> torch.Tensor:
    """The causal-LM loss by ``backend`` (default: :func:`set_default_backend`'s choice): "chunked" is
    :func:`chunked_causal_lm_loss`, "torch" :func:`torch_causal_lm_loss`, "auto" the latter where the
    installed torch has it and ``weight`` requires grad, else the former. Same arguments and result as
    :func:`chunked_causal_lm_loss`."""
    backend = backend or _default_backend
    if backend == "torch" or (backend == "auto" and weight.requires_grad and has_torch_linear_ce()):
        return torch_causal_lm_loss(hidden, weight, labels, ignore_index=ignore_index)
    return chunked_causal_lm_loss(hidden, weight, labels, ignore_index=ignore_index)


def reference_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             ignore_index: int = -100) -> torch.Tensor:
    """The unchunked definition (full fp32 logits): what :func:`chunked_causal_lm_loss` must equal."""
    logits = (hidden[:, :-1, :] @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft: LoRA layers are injected in place
    return get_base() if callable(get_base) else model


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a causal LM on ``batch`` via :func:`causal_lm_loss` (chunked by default).

    ``batch``: ``input_ids`` (B, S), optional ``attention_mask`` and ``labels`` (HF convention, -100 =
    ignored; default: the input ids). Runs the decoder stack (``get_decoder()``), then the chunked loss
    against the LM head's weight, so full logits are never formed. Models whose head has a bias or whose
    logits are soft-capped (Gemma 2) fall back to ``model(**batch).loss``, which equals it otherwise.
    """
    parts = chunk_parts(model)
    if parts is None:
        labels = batch.get("labels", batch["input_ids"])
        return model(**{**batch, "labels": labels}).loss
    return parts_loss(parts, batch, loss_labels(batch))


def parts_loss(parts: tuple[torch.nn.Module, torch.nn.Linear], batch: dict[str, torch.Tensor],
               labels: torch.Tensor) -> torch.Tensor:
    """:func:`model_loss` on the (decoder, head) of :func:`chunk_parts` with the labels already formed (the
    sharded path counts their targets too)."""
    dec, head = parts
    hidden = dec(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
    return causal_lm_loss(hidden, head.weight, labels)


def chunk_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder stack, LM head) when the chunked loss equals the model's own (a bias-free linear head, no
    logit soft-capping or scaling); None otherwise."""
    base = _unwrap(model)
    get_dec = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    dec = get_dec() if callable(get_dec) else None
    cfg = getattr(base, "config", None)
    plain_head = (isinstance(head, torch.nn.Linear) and head.bias is None
                  and not getattr(cfg, "final_logit_softcapping", None)
                  and getattr(cfg, "logit_scale", None) in (None, 1, 1.0))
    if dec is None or dec is base or not plain_head:
        return None
    return dec, head


def loss_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's labels (HF convention), or its input ids with padding (attention mask 0) ignored."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
    return labels
