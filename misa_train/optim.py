"""AdamW over a changing active set of parameters (the optimizer every method of the trainer uses).

MISA, LISA and BAdam train a different subset of the weights every period. Memory is the whole point of
those methods, so the optimizer must hold state for the *active* parameters only:

* an active parameter ``p`` (numel ``n``) owns two fp32 moment tensors ``m, v`` (``8 n`` bytes) and, when
  ``p`` is stored in bf16/fp16, an fp32 master copy ``w`` (``4 n`` bytes) that the update is applied to
  (the low-precision weight is then overwritten with ``round(w)``);
* a parameter that leaves the active set loses ``requires_grad``, its ``.grad``, its master and its
  moments; the tensors are deleted, not cached, unless ``retain_state=True``.

The update is the decoupled-weight-decay Adam of Loshchilov & Hutter with per-parameter step counters
(a module that enters at global step 500 starts its own bias correction at t = 1):

    w ← w · (1 − lr·λ)                                  (λ = weight_decay, only for decayed parameters)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g²
    w ← w − lr / (1 − β1^t) · m / (sqrt(v) / sqrt(1 − β2^t) + ε)

with the same operation order as ``torch.optim.AdamW`` so that a fixed active set reproduces it.
Every tensor operation is a ``torch._foreach_*`` call over the active list; the step counters are
Python ints, so a step never waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class ActiveAdamW:
    """AdamW whose state exists only for the currently active parameters.

    Args:
        named_params: every parameter that may ever become active, with its (unique) name; the names key
            :meth:`state_dict`. Parameters are not touched until :meth:`set_active` names them.
        betas: (β1, β2) of Adam.
        eps: ε added to sqrt(v̂) (same units as the gradient).
        weight_decay: λ of the decoupled decay, applied as ``w ← w(1 − lr·λ)``.
        retain_state: keep master and moments of parameters that leave the active set on their device, so a
            module drawn again resumes its moments. Memory cost: 8 bytes (+4 for bf16/fp16 weights) per
            parameter of *every module ever active*, i.e. up to the footprint of full AdamW.
        decay: predicate ``(name, param) -> bool`` choosing which parameters are decayed (default: all,
            as ``torch.optim.AdamW`` does).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 retain_state: bool = False,
                 decay: Callable[[str, torch.nn.Parameter], bool] | None = None) -> None:
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.betas = (b1, b2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.retain_state = bool(retain_state)
        self._params: dict[str, torch.nn.Parameter] = {}
        self._name_of: dict[int, str] = {}
        for name, p in named_params:
            if id(p) in self._name_of:  # tied weights: one parameter, first name wins
                continue
            if name in self._params:
                raise ValueError(f"named_params: duplicate name {name!r}")
            self._params[name] = p
            self._name_of[id(p)] = name
        decay = decay or (lambda _n, _p: True)
        self._decay = {name: bool(decay(name, p)) for name, p in self._params.items()}
        # name -> {"step": int, "exp_avg": T, "exp_avg_sq": T, ("master": T)}; insertion order = active order
        self.state: dict[str, dict[str, Any]] = {}
        self._retained: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ active set
    @property
    def active_names(self) -> list[str]:
        """Names of the active parameters, in activation order."""
        return list(self.state)

    @property
    def active_params(self) -> list[torch.nn.Parameter]:
        """The active parameters, in activation order."""
        return [self._params[n] for n in self.state]

    def param(self, name: str) -> torch.nn.Parameter:
        """The parameter registered as ``name`` (KeyError naming it if it was not given to the constructor)."""
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"unknown parameter name {name!r}") from None

    def name_of(self, p: torch.nn.Parameter) -> str:
        """Registered name of parameter ``p`` (KeyError if it was not given to the constructor)."""
        try:
            return self._name_of[id(p)]
        except KeyError:
            raise KeyError("parameter was not registered with this optimizer") from None

    def set_active(self, params: Iterable[torch.nn.Parameter | str]) -> None:
        """Make exactly ``params`` (parameters or registered names) trainable.

        Parameters that stay keep their state. Parameters that leave get ``requires_grad=False`` and
        ``grad=None``; their master and moments are deleted (or parked when ``retain_state``).
        Parameters that enter get ``requires_grad=True``, a fresh fp32 master if stored in bf16/fp16
        (copied from the current weight) and zero moments with step counter 0 (or their parked state).
        """
        names: list[str] = []
        seen: set[str] = set()
        for q in params:
            n = q if isinstance(q, str) else self.name_of(q)
            if n not in self._params:
                raise KeyError(f"unknown parameter name {n!r}")
            if n not in seen:
                seen.add(n)
                names.append(n)
        for n in [n for n in self.state if n not in seen]:
            p = self._params[n]
            p.grad = None
            p.requires_grad_(False)
            st = self.state.pop(n)
            if self.retain_state:
                self._retained[n] = st
        for n in names:
            if n in self.state:
                continue
            p = self._params[n]
            p.requires_grad_(True)
            st = self._retained.pop(n, None)
            self.state[n] = st if st is not None else self._fresh_state(p)

    def _fresh_state(self, p: torch.nn.Parameter) -> dict[str, Any]:
        st: dict[str, Any] = {"step": 0}
        with torch.no_grad():
            if p.dtype in _LOW_PRECISION:
                st["master"] = p.detach().to(torch.float32, copy=True)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return st

    def zero_grad(self) -> None:
        """Drop the gradients of the active parameters (set to None: no memory held between steps)."""
        for p in self.active_params:
            p.grad = None

    # ------------------------------------------------------------------ memory accounting
    def state_bytes(self) -> int:
        """Bytes of Adam moments held for active parameters (``8 n`` per active parameter of numel n)."""
        return sum(_nbytes(st["exp_avg"]) + _nbytes(st["exp_avg_sq"]) for st in self.state.values())

    def master_bytes(self) -> int:
        """Bytes of fp32 master copies held for active bf16/fp16 parameters (``4 n`` each)."""
        return sum(_nbytes(st["master"]) for st in self.state.values() if "master" in st)

    def retained_bytes(self) -> int:
        """Bytes parked for inactive parameters under ``retain_state`` (moments + masters)."""
        return sum(sum(_nbytes(t) for t in st.values() if isinstance(t, torch.Tensor))
                   for st in self._retained.values())

    # ------------------------------------------------------------------ the update
    def _grads_and_targets(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """Active names that have a gradient, their fp32 update targets (master or weight) and fp32 grads."""
        names, targets, grads = [], [], []
        for n, st in self.state.items():
            p = self._params[n]
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{n}: sparse gradients are not supported")
            names.append(n)
            if "master" in st:
                targets.append(st["master"])
                grads.append(g.to(torch.float32))
            else:
                targets.append(p.detach())
                grads.append(g if g.dtype == torch.float32 else g.to(torch.float32))
        return names, targets, grads

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW step over the active parameters that have a gradient (others are skipped: no state
        change). ``lr`` is a Python float (per unit gradient step, as in torch.optim.AdamW)."""
        names, targets, grads = self._grads_and_targets()
        if not names:
            return
        lr = float(lr)
        b1, b2 = self.betas
        states = [self.state[n] for n in names]
        for st in states:
            st["step"] += 1
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        if self.weight_decay != 0:
            decayed = [t for n, t in zip(names, targets, strict=True) if self._decay[n]]
            if decayed:
                torch._foreach_mul_(decayed, 1 - lr * self.weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
        del grads
        step_size = [-(lr / (1 - b1 ** st["step"])) for st in states]
        bc2_sqrt = [(1 - b2 ** st["step"]) ** 0.5 for st in states]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(targets, exp_avgs, denom, step_size)
        del denom
        low = [(self._params[n].detach(), st["master"]) for n, st in zip(names, states, strict=True)
               if "master" in st]
        if low:
            # the low-precision weight the forward pass uses is the rounding of the fp32 master; under FSDP both
            # are DTensors with the same sharding, and DTensor has no rule for _foreach_copy_ (torch 2.11), so
            # the copy runs shard to shard
            torch._foreach_copy_([_local(w) for w, _ in low], [_local(m) for _, m in low])

    @torch.no_grad()
    def scale_grads_(self, factors: Mapping[str, float]) -> None:
        """Multiply the gradient of each named active parameter by a Python scalar (e.g. 1/π_b)."""
        pairs = [(self._params[n].grad, float(f)) for n, f in factors.items()
                 if n in self.state and self._params[n].grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [f for _, f in pairs])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the active gradients to global L2 norm ``max_norm``; return the pre-clip norm (0-d fp32
        tensor on the gradients' device, not synchronised).

        ``‖g‖ = sqrt(Σ_p ‖g_p‖²)`` computed in fp32; every gradient is multiplied by
        ``min(1, max_norm / (‖g‖ + 1e-6))`` (torch.nn.utils.clip_grad_norm_ semantics, no host branch).
        """
        grads = [p.grad for p in self.active_params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        total = global_grad_norm(grads)
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        for (dev, dt), gs in by_key.items():
            torch._foreach_mul_(gs, coef.to(device=dev, dtype=dt))
        return total

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """``{"active": [names], "state": {name: {step, exp_avg, exp_avg_sq[, master]}}, "retained": {...},
        "hyper": {...}}``; tensors are references (the caller saves or clones them)."""
        return {
            "active": self.active_names,
            "state": {n: dict(st) for n, st in self.state.items()},
            "retained": {n: dict(st) for n, st in self._retained.items()},
            "hyper": {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                      "retain_state": self.retain_state},
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: activates the saved set and copies moments/masters/steps in
        (to each parameter's device). The hyper-parameters of this instance are kept."""
        unknown = [n for n in d["active"] if n not in self._params]
        if unknown:
            raise KeyError(f"state_dict names unknown parameters: {unknown[:3]}")
        self._retained.clear()
        self.set_active(d["active"])
        for n in d["active"]:
            self.state[n] = _restore(d["state"][n], self._params[n])
        for n, st in d.get("retained", {}).items():
            if n in self._params and n not in self.state:
                self._retained[n] = _restore(st, self._params[n])


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(Σ_i ‖g_i‖²) in fp32 on the first gradient's device, from one fused norm per device/dtype."""
    norms = per_tensor_sq_norms(grads)
    return torch.sqrt(norms.sum())


def per_tensor_sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stacked ‖t_i‖² (fp32, shape (len(tensors),), on the first tensor's device) via ``_foreach_norm``.

    The norm is taken in fp32 whatever the tensors' dtype, so bf16 gradients do not lose the sum."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    dev = tensors[0].device
    norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
    return torch.stack([t.to(dev, non_blocking=True) for t in norms]).square()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the DTensor); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _restore(st: Mapping[str, Any], p: torch.nn.Parameter) -> dict[str, Any]:
    out: dict[str, Any] = {"step": int(st["step"])}
    for key in ("exp_avg", "exp_avg_sq", "master"):
        if key in st:
            t = st[key]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"state_dict: {key} of shape {tuple(t.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
            out[key] = t.detach().to(device=p.device, dtype=torch.float32, copy=True)
    if p.dtype in _LOW_PRECISION and "master" not in out:
        out["master"] = p.detach().to(torch.float32, copy=True)
    return out
