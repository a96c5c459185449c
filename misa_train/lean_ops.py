r"""Activation-lean SwiGLU and RMSNorm for Hugging Face Llama-style decoders (same forward, less saved).

MISA trains a few weight matrices; frozen linears save nothing for backward, so most of what autograd still
keeps is saved by two small blocks of every decoder layer. Written with plain tensor ops they save more than
their backward needs:

* SwiGLU ``y = silu(g) ⊙ u`` (g = gate_proj(x), u = up_proj(x)): plain autograd saves g (for SiLU's
  backward), silu(g) and u (for the product): three (tokens × intermediate) tensors. :class:`SwiGLU` saves
  g and u only and recomputes σ(g) in backward:

      ∂y/∂u = silu(g) = g·σ(g),      ∂y/∂g = u · σ(g) · (1 + g·(1 − σ(g)))

  so dg = dy·u·σ(g)(1 + g(1 − σ(g))), du = dy·silu(g).
* RMSNorm ``y = w ⊙ cast(x̂)``, ``x̂ = x₃₂ · r``, ``r = 1/sqrt(mean(x₃₂², -1) + ε)`` (x₃₂ = x upcast to fp32,
  cast = back to x's dtype): plain autograd keeps the fp32 copy x₃₂ (4 B/element for a bf16 model).
  :class:`RMSNormFn` keeps x in its own dtype (2 B/element) and r (one fp32 per row) and uses

      dw = Σ_rows dy·x̂,      gx̂ = dy·w,      dx = r · (gx̂ − x̂ · mean(gx̂ ⊙ x̂, -1))

  (the Jacobian of x ↦ x·r(x) applied to gx̂; r' = −r³·x/n gives the projection term).

Both forwards are the Hugging Face computation op for op (bit-identical outputs in fp32 and bf16); the
backwards compute in fp32 (float64 for float64 inputs, so ``gradcheck`` works) and cast to the input dtype.
Backward works on row chunks of at most ``_CHUNK_ELEMS`` elements so its fp32 temporaries stay a few MB
even where a layer's activations are hundreds of MB: the gradients themselves are allocated once, in the
input dtype, as plain autograd would.

:func:`patch_model` swaps these into a loaded model by replacing the ``forward`` of the matching module
instances (never their classes, parameters or state dict); the MLP forward still calls ``self.gate_proj``
etc., so peft-wrapped or otherwise substituted linears keep working. :mod:`misa_train.fused_ops` patches the
same modules with a torch.compile'd variant (fused kernels, the same tensors saved).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

__all__ = ["SwiGLU", "RMSNormFn", "swiglu", "rms_norm", "patch_model", "unpatch_model", "is_patched",
           "patched_variant"]

# Rows per backward chunk are chosen so one fp32 temporary holds at most this many elements (128 MiB): large
# enough that a 1k-token step is one chunk (kernel launches, not bandwidth, bound these small ops on a GPU).
_CHUNK_ELEMS = 1 << 25
_MARK = "_misa_lean_ops"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or float64 when the input is float64 (HF would downcast it; we keep precision for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // max(1, width))
    return [slice(a, a + step) for a in range(0, rows, step)]


class SwiGLU(torch.autograd.Function):
    """``y = silu(g) ⊙ u`` saving only g and u (not silu(g)); see the module docstring for the backward.

    Only the tensors the requested gradients need are saved: g always, u only when g requires grad.
    """

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # the same two ops as HF's act_fn(gate) * up, so outputs are bit-identical in every dtype
        y = nn.functional.silu(g) * u
        need_g, _ = ctx.needs_input_grad
        ctx.save_for_backward(g, u if need_g else None)
        ctx.u_dtype = u.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad
        width = g.shape[-1]
        g2, dy2 = g.reshape(-1, width), dy.reshape(-1, width)
        u2 = u.reshape(-1, width) if u is not None else None
        cd = _compute_dtype(g.dtype)
        dg = torch.empty_like(g2) if need_g else None
        du = torch.empty(g2.shape, dtype=ctx.u_dtype, device=g.device) if need_u else None
        for rows in _row_chunks(g2.shape[0], width):
            gc = g2[rows].to(cd)
            s = torch.sigmoid(gc)
            dyc = dy2[rows].to(cd)
            if du is not None:
                du[rows] = dyc * (gc * s)
            if dg is not None:
                dg[rows] = dyc * u2[rows].to(cd) * s * (1.0 + gc * (1.0 - s))
        return (dg.view(g.shape) if dg is not None else None,
                du.view(g.shape) if du is not None else None)


class RMSNormFn(torch.autograd.Function):
    """HF LlamaRMSNorm: ``y = w ⊙ (x₃₂ · r).to(x.dtype)``, saving x (own dtype) and r (fp32, shape (..., 1)).

    Backward (fp32): x̂ = x₃₂·r; dw = Σ_rows dy·x̂ (only if w requires grad); gx̂ = dy·w;
    dx = r·(gx̂ − x̂·mean(gx̂ ⊙ x̂, -1)).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # op for op HF's LlamaRMSNorm.forward (fp32 statistics, cast back before scaling by w), but the three
        # full-size results (x₃₂², x₃₂·r, w·(…)) share one buffer instead of three fresh tensors: the same
        # kernels, so the same bits; fewer transient (tokens × hidden) tensors per norm (on a CPU each freed one
        # is a heap hole that the next allocation of the same size cannot reuse, see docs/trainer.md)
        x32 = x.to(_compute_dtype(x.dtype))
        buf = x32.pow(2)
        r = torch.rsqrt(buf.mean(-1, keepdim=True) + eps)
        xh = torch.mul(x32, r, out=buf)
        y = xh.to(x.dtype)
        if y.dtype == weight.dtype and y.shape == torch.broadcast_shapes(y.shape, weight.shape):
            y.mul_(weight)  # w ⊙ ŷ == ŷ ⊙ w bit for bit; in place only where no promotion/broadcast grows it
        else:
            y = weight * y
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        n = x.shape[-1]
        cd = r.dtype
        x2, r2 = x.reshape(-1, n), r.reshape(-1, 1)
        dy2 = dy.reshape(-1, n)
        w = weight.to(cd)
        dx = torch.empty_like(x2) if need_x else None
        dw = torch.zeros(n, dtype=cd, device=x.device) if need_w else None
        for rows in _row_chunks(x2.shape[0], n):
            rc = r2[rows]
            xh = x2[rows].to(cd) * rc
            dyc = dy2[rows].to(cd)
            if dw is not None:
                dw += (dyc * xh).sum(0)
            if dx is not None:
                gxh = dyc * w
                dx[rows] = rc * (gxh - xh * (gxh * xh).mean(-1, keepdim=True))
        return (dx.view(x.shape) if dx is not None else None,
                dw.to(weight.dtype).view(weight.shape) if dw is not None else None,
                None)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` through :class:`SwiGLU`."""
    return SwiGLU.apply(g, u)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF-exact RMSNorm through :class:`RMSNormFn`; ``weight`` must have shape (x.shape[-1],)."""
    return RMSNormFn.apply(x, weight, eps)


def _lean_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _lean_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _norm_classes() -> tuple[type, ...]:
    """The HF RMSNorm classes whose forward is exactly ``w * (x32 * r).to(dtype)`` (Gemma's 1 + w is not)."""
    out: list[type] = []
    for mod, name in (("llama", "LlamaRMSNorm"), ("qwen2", "Qwen2RMSNorm"), ("mistral", "MistralRMSNorm")):
        try:
            m = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=[name])
            out.append(getattr(m, name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _silu_classes() -> tuple[type, ...]:
    out: list[type] = [nn.SiLU]
    try:
        from transformers.activations import SiLUActivation
        out.append(SiLUActivation)
    except ImportError:
        pass
    return tuple(out)


def _is_swiglu_mlp(m: nn.Module, silu: tuple[type, ...]) -> bool:
    # structural match on HF MLP classes (LlamaMLP, Qwen2MLP, MistralMLP, ...) that compute
    # down(act(gate(x)) * up(x)); the SiLU check excludes GELU-gated ones such as Gemma's
    return (type(m).__module__.startswith("transformers.")
            and all(isinstance(getattr(m, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)) in silu)


def _is_rms_norm(m: nn.Module, norms: tuple[type, ...]) -> bool:
    return (type(m) in norms and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and hasattr(m, "variance_epsilon"))


def is_patched(module: nn.Module) -> bool:
    """Whether :func:`patch_model` replaced this module's forward."""
    return bool(module.__dict__.get(_MARK, False))


def patch_model(model: nn.Module) -> int:
    """Swap the lean SwiGLU/RMSNorm forwards into every matching module of ``model``; returns how many.

    Matches: MLPs of HF classes with ``gate_proj``/``up_proj``/``down_proj`` and a SiLU ``act_fn`` (Llama,
    Qwen2, Mistral), and modules of exactly LlamaRMSNorm/Qwen2RMSNorm/MistralRMSNorm. Everything else
    (Gemma's GELU MLP and 1 + w norm, GPT-2, other classes) is left alone. Idempotent: modules patched
    before are not counted again. Only the instance's ``forward`` changes (``types.MethodType``).
    """
    return patch_with(model, _lean_mlp_forward, _lean_norm_forward, "eager")


def patch_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Not yet patched modules that :func:`patch_model` would patch, as (module, "mlp" | "norm")."""
    silu, norms = _silu_classes(), _norm_classes()
    out: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if is_patched(m):
            continue
        if _is_swiglu_mlp(m, silu):
            out.append((m, "mlp"))
        elif _is_rms_norm(m, norms):
            out.append((m, "norm"))
    return out


def patch_with(model: nn.Module, mlp_forward: Any, norm_forward: Any, variant: str) -> int:
    """Patch :func:`patch_targets` with these forwards; the mark records ``variant`` (see :func:`patched_variant`)."""
    targets = patch_targets(model)
    for m, kind in targets:
        m.forward = types.MethodType(mlp_forward if kind == "mlp" else norm_forward, m)
        setattr(m, _MARK, variant)
    return len(targets)


def patched_variant(module: nn.Module) -> str | None:
    """``"eager"`` (:func:`patch_model`), ``"compiled"`` (misa_train.fused_ops.patch_model) or None."""
    v = module.__dict__.get(_MARK)
    return None if not v else ("eager" if v is True else str(v))


def unpatch_model(model: nn.Module) -> int:
    """Undo :func:`patch_model` (restores the class forwards); returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if is_patched(m):
            del m.forward
            delattr(m, _MARK)
            n += 1
    return n
