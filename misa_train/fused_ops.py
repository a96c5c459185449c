r"""Compiled lean SwiGLU and RMSNorm: what :mod:`misa_train.lean_ops` saves, in fused kernels (torch.compile).

The eager lean ops save less for backward than Hugging Face's ops but cost speed (their backward is a row
loop of fp32 tensor ops: more kernel launches and memory passes; −12% tokens/s on an H100, docs/results.md).
Here the same two elementwise pieces, written as HF writes them,

    swiglu(g, u) = silu(g) * u
    rms_norm(x, w, eps) = w * (x₃₂ · rsqrt(mean(x₃₂², -1) + eps)).to(x.dtype)

are compiled with ``torch.compile`` (inductor by default): AOTAutograd traces forward and backward together and
its min-cut partitioner saves only what backward needs — for these chains g and u, and x with the fp32 row
statistic r (plus the weight), exactly what the eager lean ops save, so the memory model's ``lean_ops=True``
accounting applies — while inductor emits one fused kernel per forward and one or two per backward (Triton
on CUDA, C++ on CPU).

* Only these two small pure functions are compiled (``fullgraph=True``), never the model. Inputs are flattened
  to (rows, width) and rows is marked dynamic, so every batch × sequence length shares one graph; width is
  a constant of the model.
* A graph exists per requires_grad pattern of the inputs, and MISA changes which inputs need grad from period
  to period (the lowest active layer moves). :func:`patch_model` therefore compiles every pattern up front,
  on the model's device and dtype, with ``rows_hint`` rows (inductor picks kernel configurations from that
  size), and checks each against the uncompiled computation (outputs and gradients) and against the eager
  lean op (bytes saved for backward). So compilation happens at patch time, not inside a training step.
* Any failure there (no Triton, a compiler error, a mismatch) raises :class:`~misa_train.config.ConfigError`
  with a one-line message, before anything is patched: the option never runs uncompiled in silence.
  Saving more than the eager lean op raises too (``strict=True``) or, with ``strict=False`` (the benchmark),
  is returned in the report so a measurement can still be taken.
* With grad disabled (evaluation, generation) the uncompiled computation runs: nothing is saved there, and
  generation's one-token shapes would otherwise compile further graphs.

``BACKEND`` is a module-level knob: tests set ``"aot_eager_decomp_partition"`` (inductor's decompositions and
partitioner, no code generation: seconds instead of a C++ build per graph).
"""

from __future__ import annotations

import itertools
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from misa_train import lean_ops
from misa_train.config import ConfigError

__all__ = ["BACKEND", "swiglu", "rms_norm", "patch_model", "warm_up", "compiled_graphs"]

# torch.compile backend: a registered name or a backend callable (tests use "aot_eager_decomp_partition")
BACKEND: str | Callable[..., Any] = "inductor"
# rows of the warm-up tensors at most (the kernel configuration hint; bigger only costs memory)
_MAX_WARM_ROWS = 2048
_compiled: dict[tuple[str, Any], Callable[..., torch.Tensor]] = {}


def _swiglu_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(g) * u  # HF: act_fn(gate_proj(x)) * up_proj(x)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # op for op HF's LlamaRMSNorm.forward
    x32 = x.to(torch.float32)
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * r).to(x.dtype)


_REF = {"swiglu": _swiglu_ref, "rms_norm": _rms_norm_ref}


def _fresh(fn: Callable[..., torch.Tensor], tag: str) -> Callable[..., torch.Tensor]:
    """A copy of ``fn`` with its own code object: Dynamo keeps its graphs (and its recompile limit) per code object."""
    code = fn.__code__
    name = f"{code.co_name}__{tag}"
    kw = {"co_name": name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {})}
    return types.FunctionType(code.replace(**kw), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _get(name: str, like: torch.Tensor, needs: tuple[bool, bool]) -> Callable[..., torch.Tensor]:
    """The compiled op for this backend, device, dtype and requires_grad pattern of the two tensor inputs.

    One compiled function (own code object) per key, so each holds one graph: no entry hits Dynamo's
    recompile limit (8 per code object, a hard error with fullgraph) however many dtypes, devices and patterns
    a process uses, and a call checks the guards of one graph only."""
    key = (name, BACKEND, like.device, like.dtype, needs)
    fn = _compiled.get(key)
    if fn is None:
        tag = f"{like.device.type}{like.device.index or ''}_{str(like.dtype)[6:]}_{int(needs[0])}{int(needs[1])}"
        # dynamic=None + maybe_mark_dynamic(rows): only the row count is symbolic, the width stays static
        fn = _compiled[key] = torch.compile(_fresh(_REF[name], tag), backend=BACKEND, fullgraph=True)
    return fn


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    torch._dynamo.maybe_mark_dynamic(t2, 0)
    return t2


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u``: compiled when grad is enabled, else the plain ops."""
    if not torch.is_grad_enabled():
        return _swiglu_ref(g, u)
    w = g.shape[-1]
    fn = _get("swiglu", g, (g.requires_grad, u.requires_grad))
    return fn(_rows(g, w), _rows(u, w)).reshape(g.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: compiled when grad is enabled, else the plain ops; ``weight`` has shape (x.shape[-1],)."""
    if not torch.is_grad_enabled():
        return _rms_norm_ref(x, weight, eps)
    n = x.shape[-1]
    fn = _get("rms_norm", x, (x.requires_grad, weight.requires_grad))
    return fn(_rows(x, n), weight, eps).reshape(x.shape)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def compiled_graphs() -> int | None:
    """Graphs Dynamo has compiled in this process (any function), or None where the counter is missing."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a private counter; absence only loses a diagnostic
        return None


def _saved_bytes(fn: Callable[..., torch.Tensor], args: tuple[Any, ...], skip: set[int]) -> tuple[torch.Tensor, int]:
    """Output of ``fn(*args)`` and the bytes of distinct storages autograd saved for its backward."""
    store: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            store[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*args)
    return y, sum(store.values())


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    # fused kernels round once where eager rounds per op: bf16/fp16 differ by a few units in the last place
    tol = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    a, b = a.detach().double(), b.detach().double()
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-6)


def _check_one(name: str, width: int, rows: int, device: torch.device, dtype: torch.dtype, eps: float,
               needs: tuple[bool, bool]) -> tuple[int, int]:
    """Compile ``name`` for one requires_grad pattern; compare it with the plain and lean ops.

    Returns (bytes the compiled op saved, bytes the eager lean op saves). Raises AssertionError on a mismatch."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if name == "swiglu":
        a, b = rand(rows, width), rand(rows, width)
        lean = lean_ops.swiglu
        extra: tuple[Any, ...] = ()
    else:
        # an nn.Parameter, as in the model: Dynamo guards on the type, so a plain tensor would compile a
        # graph that the model's calls never hit
        a, b = rand(rows, width), nn.Parameter(1.0 + 0.1 * rand(width), requires_grad=needs[1])
        lean = lean_ops.rms_norm
        extra = (eps,)
    a.requires_grad_(needs[0])
    b.requires_grad_(needs[1])
    skip = {b.untyped_storage().data_ptr()} if name == "rms_norm" else set()  # the weight is a parameter
    dy = rand(rows, width)
    compiled = _get(name, a, needs)
    a2 = a.detach().requires_grad_(needs[0])
    torch._dynamo.maybe_mark_dynamic(a2, 0)
    if name == "swiglu":
        b2 = b.detach().requires_grad_(needs[1])
        torch._dynamo.maybe_mark_dynamic(b2, 0)
    else:
        b2 = b
    with torch.enable_grad():
        y, saved = _saved_bytes(compiled, (a2, b2, *extra), skip)
        ref = _REF[name](a, b, *extra)
        _, lean_saved = _saved_bytes(lean, (a.detach().requires_grad_(needs[0]),
                                            b.detach().requires_grad_(needs[1]), *extra),
                                     {b.untyped_storage().data_ptr()} if name == "rms_norm" else set())
    assert _close(y, ref, dtype), f"{name} output differs from the uncompiled ops"
    if any(needs):
        ins = [t for t, n in zip((a2, b2), needs, strict=True) if n]
        refs = [t for t, n in zip((a, b), needs, strict=True) if n]
        got = torch.autograd.grad(y, ins, dy)
        want = torch.autograd.grad(ref, refs, dy)
        for k, (p, q) in enumerate(zip(got, want, strict=True)):
            assert _close(p, q, dtype), f"{name} gradient {k} differs from the uncompiled ops"
    return saved, lean_saved


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception (Dynamo wraps a backend's error in BackendCompilerFailed / InductorError)."""
    seen = {id(e)}
    while True:
        nxt = getattr(e, "inner_exception", None) or e.__cause__
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def warm_up(kinds: dict[str, int], device: torch.device, dtype: torch.dtype, *, eps: float = 1e-6,
            rows_hint: int = _MAX_WARM_ROWS, strict: bool = True) -> dict[str, Any]:
    """Compile and check every requires_grad pattern of the ops in ``kinds`` ({"swiglu": I, "rms_norm": h}).

    Returns ``{"seconds", "graphs", "saved": {"<op> <needs>": [compiled bytes, lean bytes]}, "lean": bool}``;
    raises ConfigError (one line) on any compile error or mismatch, and, with ``strict``, when a compiled op
    saves more for backward than the eager lean op."""
    if getattr(torch._dynamo.config, "disable", False):
        raise ConfigError("compile_ops: torch.compile is disabled in this process (TORCHDYNAMO_DISABLE=1); "
                          "use lean ops without compilation")
    rows = max(2, min(int(rows_hint), _MAX_WARM_ROWS))
    t0, g0 = time.perf_counter(), compiled_graphs()
    report: dict[str, Any] = {"saved": {}, "lean": True}
    for name, width in kinds.items():
        for needs in itertools.product((True, False), repeat=2):
            try:
                saved, lean = _check_one(name, int(width), rows, device, dtype, eps, needs)
            except AssertionError as e:
                raise ConfigError(f"compile_ops: {e} ({device}, {dtype}, requires_grad {needs}); "
                                  "use lean ops without compilation") from None
            except Exception as e:  # noqa: BLE001 - any compiler failure becomes one line
                root = _root_cause(e)
                first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")[:300]
                backend = getattr(BACKEND, "__name__", BACKEND)
                raise ConfigError(f"compile_ops: torch.compile (backend {backend}) failed for {name} on "
                                  f"{device}/{dtype}: {type(root).__name__}: {first}; "
                                  "use lean ops without compilation") from None
            report["saved"][f"{name} {needs}"] = [saved, lean]
            if saved > lean:
                report["lean"] = False
                if strict:
                    raise ConfigError(f"compile_ops: compiled {name} saves {saved} bytes for backward where the "
                                      f"lean op saves {lean} ({device}, {dtype}, requires_grad {needs}); "
                                      "use lean ops without compilation")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up tensors; peak statistics are the caller's to reset
    g1 = compiled_graphs()
    report["graphs"] = None if g0 is None or g1 is None else g1 - g0
    report["seconds"] = time.perf_counter() - t0
    return report


def patch_model(model: nn.Module, *, rows_hint: int = _MAX_WARM_ROWS, strict: bool = True,
                report: dict[str, Any] | None = None) -> int:
    """Compile, check and patch the fused lean SwiGLU/RMSNorm into ``model``; returns how many modules.

    Matches the modules :func:`misa_train.lean_ops.patch_model` matches (and skips modules patched before
    by either). Compilation and the checks (see :func:`warm_up`) happen first, on the device and dtype of
    the matched modules' parameters; on failure ConfigError is raised and nothing is patched. ``report``,
    if given, is filled with :func:`warm_up`'s report."""
    targets = lean_ops.patch_targets(model)
    if not targets:
        return 0
    groups: dict[tuple[torch.device, torch.dtype], dict[str, int]] = {}
    eps = 1e-6
    for m, kind in targets:
        if kind == "mlp":
            p = next(m.parameters())
            width = getattr(m, "intermediate_size", None) or m.gate_proj.weight.shape[0]
            groups.setdefault((p.device, p.dtype), {})["swiglu"] = int(width)
        else:
            eps = float(m.variance_epsilon)
            groups.setdefault((m.weight.device, m.weight.dtype), {})["rms_norm"] = int(m.weight.shape[0])
    merged: dict[str, Any] = {"seconds": 0.0, "graphs": 0, "saved": {}, "lean": True}
    for (device, dtype), kinds in groups.items():
        r = warm_up(kinds, device, dtype, eps=eps, rows_hint=rows_hint, strict=strict)
        merged["seconds"] += r["seconds"]
        merged["graphs"] = None if r["graphs"] is None or merged["graphs"] is None else merged["graphs"] + r["graphs"]
        merged["saved"].update(r["saved"])
        merged["lean"] = merged["lean"] and r["lean"]
    if report is not None:
        report.update(merged)
    return lean_ops.patch_with(model, _mlp_forward, _norm_forward, "compiled")
