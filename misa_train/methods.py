"""One strategy object per training method; the training loop is the same for all of them.

    m = build_method(cfg, model, modules, total_params)
    for step in range(max_steps):
        m.begin_period(step)                # draws a new active set when step % T == 0
        loss.backward()                     # (all micro-batches of the step)
        m.after_backward()                  # ‖g_b‖² of active modules into an on-device accumulator
        m.clip_grad_norm_(cfg.clip_grad)    # optional
        m.step(lr)                          # AdamW over the active set, grads dropped
        if (step + 1) % T == 0: m.end_period()   # one host transfer -> sampler.observe

Methods:

* ``misa``  – module-wise draws of ModuleSampler(rule = cfg.rule ∈ {misa, optimal, uniform}), budget
  ``floor(δ · total_params)`` parameters of modules per period.
* ``lisa``  – ModuleSampler(rule="lisa"): ``cfg.lisa_layers`` whole decoder layers drawn per period.
* ``badam`` – ModuleSampler(rule="badam"): ``cfg.badam_layers`` whole layers, visited in a reshuffled cycle.
* ``full``  – every parameter active forever (the same optimizer code path: MISA with δ = 1 and all
  always-on groups enabled reproduces it step for step).
* ``lora``  – peft LoRA adapters on every module kind; only adapter weights train.

Parameters that are neither modules nor always-on (cfg.train_embeddings / train_head / train_norms) are frozen.
``train_norms`` covers every 1-D parameter outside the modules (normalisation weights and biases of the
projections): they are O(hidden) per layer, and including the biases lets δ = 1 match full fine-tuning.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .modules import ModuleInfo, embedding_and_head_params, norm_params
from .optim import ActiveAdamW, per_tensor_sq_norms

SAMPLED = ("misa", "lisa", "badam")


class Method:
    """Training strategy: which parameters train when, and the optimizer over them.

    Attributes:
        name: "misa" | "lisa" | "badam" | "full" | "lora".
        model: the model to run forward/backward on (the peft wrapper for lora).
        modules: find_modules' list (base weights, also for lora).
        optimizer: ActiveAdamW over the active set.
        sampler: ModuleSampler for sampled methods, else None.
        period: T, optimizer steps between draws.
    """

    def __init__(self, name: str, model: nn.Module, modules: Sequence[ModuleInfo], optimizer: ActiveAdamW,
                 *, period: int, always_on: Sequence[str] = (), sampler: Any = None,
                 reweight: bool = False, fixed: Sequence[str] | None = None,
                 total_params: int | None = None) -> None:
        self.name = name
        self.model = model
        self.modules = list(modules)
        self.optimizer = optimizer
        self.sampler = sampler
        self.period = int(period)
        self.reweight = bool(reweight)
        self.total_params = total_params
        self._always_on = list(always_on)
        self._fixed = None if fixed is None else list(fixed)  # full/lora: one set, active forever
        self._active = np.zeros(0, dtype=np.int64)
        self._started = False
        self._period_start = 0
        self._acc: torch.Tensor | None = None
        self._acc_steps = 0
        self._inv_pi: np.ndarray | None = None
        dev = self.modules[0].param.device if self.modules else torch.device("cpu")
        self._acc_device = dev
        self._host = dev.type == "cpu"  # activations and gradients live in the C heap: trim it after a step
        # set by the distributed trainer: sums the accumulator over ranks before the host transfer
        self.allreduce: Any = None

    # ------------------------------------------------------------------ the loop
    @property
    def started(self) -> bool:
        """Whether an active set is in place: drawn by :meth:`begin_period` or restored by :meth:`load_state_dict`."""
        return self._started

    def begin_period(self, step: int) -> bool:
        """At ``step % period == 0`` (or on the first call): draw the next active set and make exactly it
        trainable, freeing what left. Returns True when the active set was (re)drawn.

        A period whose importance was accumulated but not yet observed is observed first, so the sampler
        never loses a period even if the caller forgot :meth:`end_period`.
        """
        if self._started and (self.sampler is None or step % self.period != 0):
            return False
        if self.sampler is None:
            self.optimizer.set_active(self._fixed or [])
            self._active = np.arange(len(self.modules), dtype=np.int64)
        else:
            if self._acc_steps > 0:
                self.end_period()
            # an exploration draw is a cycle, not a π design: there is no π to divide by
            exploring = bool(getattr(self.sampler, "exploring", False))
            idx = np.asarray(self.sampler.draw(), dtype=np.int64)
            self._active = idx
            self.optimizer.set_active(self._always_on + [self.modules[i].name for i in idx])
            self._acc = torch.zeros(len(idx), dtype=torch.float32, device=self._acc_device)
            self._acc_steps = 0
            pi = None if exploring else getattr(self.sampler, "last_inclusion", None)
            self._inv_pi = None if pi is None else 1.0 / np.asarray(pi, dtype=np.float64)[idx]
        self._started = True
        self._period_start = int(step)
        return True

    def probe_importance(self, loss_fn: Any) -> bool:
        """Measure ‖g_b‖² of *every* module with one forward/backward, so importance sampling starts at the
        first draw instead of after the ⌈1/δ⌉ exploration draws it takes to visit every module once.

        Every module is made trainable for this one backward only; a post-accumulate-grad hook adds the
        squared norm of each module's gradient to an on-device vector and drops the gradient at once, so the
        extra memory is the activations the now-trainable linears save for this step (the caller keeps the
        probe batch short), never a model's worth of gradients. Gradients of always-on parameters from the
        probe are dropped too, and ``requires_grad`` is restored. Returns False (nothing done) for methods
        whose sampler does not use scores or has already observed every module.
        """
        s = self.sampler
        if s is None or self._started or not bool(getattr(s, "exploring", False)):
            return False
        params = [m.param for m in self.modules]
        before = [p.requires_grad for p in params]
        sq = torch.zeros(len(params), dtype=torch.float32, device=self._acc_device)

        def hook_for(i: int) -> Any:
            def hook(p: torch.Tensor) -> None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                sq[i] += g.detach().float().pow(2).sum()
                p.grad = None
            return hook

        handles = []
        try:
            for i, p in enumerate(params):  # once per run, not on the hot path
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(hook_for(i)))
            loss_fn().backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(params, before, strict=True):
                p.requires_grad_(flag)
            for p in self.model.parameters():
                p.grad = None
        if self.allreduce is not None:
            sq = self.allreduce(sq)
        values = sq.cpu().numpy().astype(np.float64)
        if not np.all(np.isfinite(values)):  # e.g. a probe batch with no target token: keep exploring
            return False
        s.observe(np.arange(len(params)), values)
        return True

    @torch.no_grad()
    def after_backward(self) -> None:
        """Add ‖g_b‖² (fp32, Frobenius) of every active module to the period's on-device accumulator.

        Call once per optimizer step, after the last micro-batch's backward and before clipping. One fused
        ``_foreach_norm`` over the active modules; no host sync. A module without a gradient counts 0.
        With ``reweight``, each active module's gradient is then scaled by 1/π_b (Horvitz–Thompson:
        E[1{b active} g_b / π_b] = g_b).
        """
        if self.sampler is None or self._acc is None or len(self._active) == 0:
            return
        grads, pos = [], []
        for j, i in enumerate(self._active):
            g = self.modules[i].param.grad
            if g is not None:
                # an FSDP2 DTensor grad: this rank's shard; its partial sum of squares is all-reduced later
                grads.append(g.to_local() if hasattr(g, "to_local") else g)
                pos.append(j)
        if grads:
            sq = per_tensor_sq_norms(grads).to(self._acc.device)
            if len(pos) == len(self._active):
                self._acc.add_(sq)
            else:
                self._acc.index_add_(0, torch.tensor(pos, device=self._acc.device), sq)
        self._acc_steps += 1
        if self.reweight and self._inv_pi is not None:
            self.optimizer.scale_grads_({self.modules[i].name: float(w)
                                         for i, w in zip(self._active, self._inv_pi, strict=True)})

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the active gradients to global L2 norm ``max_norm`` (no-op when ``max_norm <= 0``, still
        returning the norm). Returns the pre-clip norm as a 0-d fp32 tensor, not synchronised."""
        if max_norm <= 0:
            return self.optimizer.clip_grad_norm_(math.inf)
        return self.optimizer.clip_grad_norm_(max_norm)

    def step(self, lr: float) -> None:
        """AdamW step with learning rate ``lr`` over the active set, then drop the gradients.

        On the CPU the step's activations and gradients are then all freed, and :func:`release_host_memory`
        hands the free pages of the C heap back to the OS, so the next step does not run on top of them."""
        self.optimizer.step(lr)
        self.optimizer.zero_grad()
        if self._host:
            release_host_memory()

    def end_period(self) -> None:
        """Hand the period's mean squared gradient norms to the sampler: one device->host copy.

        Observed value for module b: (1/S) Σ_s ‖g_b^{(s)}‖² over the S steps with :meth:`after_backward`.
        Non-finite entries (an overflowing step) are left out rather than poisoning the scores.
        """
        if self.sampler is None or self._acc is None or self._acc_steps == 0:
            return
        acc = self._acc if self.allreduce is None else self.allreduce(self._acc)
        mean = (acc / self._acc_steps).cpu().numpy().astype(np.float64)
        ok = np.isfinite(mean)
        if ok.any():
            self.sampler.observe(self._active[ok], mean[ok])
        self._acc.zero_()
        self._acc_steps = 0

    # ------------------------------------------------------------------ reporting
    def active_indices(self) -> np.ndarray:
        """Sorted indices (into ``modules``) of the active modules; for full/lora every module."""
        return self._active.copy()

    def active_mask(self) -> np.ndarray:
        """Boolean mask over ``modules`` (True = trained this period; LoRA: carries an adapter)."""
        mask = np.zeros(len(self.modules), dtype=bool)
        mask[self._active] = True
        return mask

    def stats(self) -> dict[str, int]:
        """Sizes of what trains now (parameter counts and bytes; arithmetic only, no device sync).

        active_params: parameters with requires_grad now (active modules + always-on, or LoRA weights).
        active_module_params: the modules' part of active_params (what δ budgets).
        trainable_params: parameters this method can ever train (all modules + always-on; LoRA weights).
        state_bytes / master_bytes / retained_bytes: ActiveAdamW's moments, fp32 masters, parked state.
        """
        active = sum(p.numel() for p in self.optimizer.active_params)
        if self._fixed is not None:
            trainable = active
        else:
            trainable = (sum(m.size for m in self.modules)
                         + sum(self.optimizer.param(n).numel() for n in self._always_on))
        return {
            "active_params": int(active),
            "active_module_params": int(sum(self.modules[i].size for i in self._active))
            if self._fixed is None else 0,
            "active_modules": int(len(self._active)),
            "trainable_params": int(trainable),
            "state_bytes": self.optimizer.state_bytes(),
            "master_bytes": self.optimizer.master_bytes(),
            "retained_bytes": self.optimizer.retained_bytes(),
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Optimizer + sampler state + active set + period position (tensors are references)."""
        return {
            "method": self.name,
            "optimizer": self.optimizer.state_dict(),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "active": self._active.tolist(),
            "started": self._started,
            "period_start": self._period_start,
            "acc": None if self._acc is None else self._acc.detach().clone(),
            "acc_steps": self._acc_steps,
            "inv_pi": None if self._inv_pi is None else self._inv_pi.tolist(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` so that the next :meth:`begin_period`/step continue exactly."""
        if d.get("method") != self.name:
            raise ValueError(f"state_dict: written by method {d.get('method')!r}, this is {self.name!r}")
        if self.sampler is not None:
            if d.get("sampler") is None:
                raise ValueError("state_dict: no sampler state for a sampled method")
            self.sampler.load_state_dict(d["sampler"])
        self.optimizer.load_state_dict(d["optimizer"])
        self._active = np.asarray(d["active"], dtype=np.int64)
        self._started = bool(d["started"])
        self._period_start = int(d["period_start"])
        self._acc = None if d["acc"] is None else d["acc"].detach().to(self._acc_device, torch.float32).clone()
        self._acc_steps = int(d["acc_steps"])
        self._inv_pi = None if d["inv_pi"] is None else np.asarray(d["inv_pi"], dtype=np.float64)


# ---------------------------------------------------------------------- host memory
_malloc_trim: Any = None  # glibc's malloc_trim once looked up; False where the C library has none


def release_host_memory() -> bool:
    """Return the free pages of the C heap to the OS (glibc ``malloc_trim(0)``); False where not available.

    CPU tensors come from malloc (``posix_memalign``). Glibc serves activation-sized blocks from its heap
    once a block that size has been freed (its mmap threshold adapts upwards, to 32 MiB), and an aligned
    request asks for the block size plus alignment padding, so (before glibc 2.38) the exact-size hole a
    freed activation leaves is not reused for the next activation of that size; small long-lived
    allocations (autograd nodes, tensor headers) split the holes further. Freed activation memory
    therefore stays resident from step to step and every step's forward lays its activations out over
    more of it. Measured on SmolLM2-135M, batch 4 x 256, fp32 (docs/trainer.md): without trimming the
    heap of a MISA step is about twice its live bytes. Trimming after each step costs ~0.1 s there and
    returns those pages, so a step's peak is its own live memory plus its own holes, not the history's.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim with
                fn = None
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _malloc_trim = fn
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


# ---------------------------------------------------------------------- construction
def _named_unique(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def _decay(_name: str, p: nn.Parameter) -> bool:
    # decay matrices only: norms and biases are excluded, as in the usual transformer recipes
    return p.dim() >= 2


def _always_on_params(cfg: Any, model: nn.Module, modules: Sequence[ModuleInfo]) -> list[nn.Parameter]:
    eh = embedding_and_head_params(model)
    out: list[nn.Parameter] = []
    if getattr(cfg, "train_embeddings", False):
        out += eh.embeddings
    if getattr(cfg, "train_head", False):
        out += eh.head if not eh.tied or getattr(cfg, "train_embeddings", False) else eh.embeddings[:1]
    if getattr(cfg, "train_norms", False):
        mod_ids = {id(m.param) for m in modules}
        out += norm_params(model)
        out += [p for p in model.parameters() if p.dim() == 1 and id(p) not in mod_ids]
    seen: set[int] = set()
    uniq = []
    for p in out:
        if id(p) not in seen:
            seen.add(id(p))
            uniq.append(p)
    return uniq


def layers_delta(modules: Sequence[ModuleInfo], n_layers: int, total_params: int) -> float:
    """δ for which exactly ``n_layers`` whole decoder layers fit the budget ``floor(δ · total_params)``.

    With layer sizes s_l: budget = k · max_l s_l, which admits any k layers and (when layers are equal
    sized, the usual case) never k + 1. Raises ValueError when k is not in [1, L]."""
    sizes: dict[int, int] = {}
    for m in modules:
        sizes[m.layer] = sizes.get(m.layer, 0) + int(m.size)
    if not 1 <= n_layers <= len(sizes):
        raise ValueError(f"n_layers must lie in [1, {len(sizes)}], got {n_layers}")
    budget = n_layers * max(sizes.values())
    return min(1.0, (budget + 0.5) / float(total_params))


def build_method(cfg: Any, model: nn.Module, modules: Sequence[ModuleInfo], total_params: int) -> Method:
    """Build the strategy named by ``cfg.method`` (see the module docstring); freezes what it does not train.

    ``total_params``: the model's parameter count (tied weights once); δ budgets are fractions of it.
    """
    method = cfg.method
    opt_kw = dict(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, decay=_decay)
    if method == "lora":
        return _build_lora(cfg, model, modules, opt_kw)
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "full":
        named = _named_unique(model)
        opt = ActiveAdamW(named, **opt_kw)
        m = Method("full", model, modules, opt, period=cfg.period, fixed=[n for n, _ in named],
                   total_params=total_params)
        m.begin_period(0)
        return m
    if method not in SAMPLED:
        raise ValueError(f"method: unknown {method!r}")
    from misa_theory.sampler import ModuleSampler

    names = {id(p): n for n, p in _named_unique(model)}
    always = [names[id(p)] for p in _always_on_params(cfg, model, modules)]
    if method == "misa":
        rule, delta = cfg.rule, cfg.delta
    elif method == "lisa":
        rule, delta = "lisa", layers_delta(modules, cfg.lisa_layers, total_params)
    else:
        rule, delta = "badam", layers_delta(modules, cfg.badam_layers, total_params)
    sampler = ModuleSampler([m.size for m in modules], groups=[m.layer for m in modules], delta=delta,
                            rule=rule, seed=cfg.seed, total_params=total_params, eta=cfg.eta,
                            ema_beta=cfg.ema_beta, min_inclusion=cfg.min_inclusion,
                            depth_bias=cfg.depth_bias if method == "misa" else 0.0)
    candidates = always + [m.name for m in modules]
    opt = ActiveAdamW([(n, p) for n, p in _named_unique(model) if n in set(candidates)],
                      retain_state=cfg.retain_state, **opt_kw)
    return Method(method, model, modules, opt, period=cfg.period, always_on=always, sampler=sampler,
                  reweight=cfg.reweight, total_params=total_params)


def _build_lora(cfg: Any, model: nn.Module, modules: Sequence[ModuleInfo], opt_kw: dict) -> Method:
    from peft import LoraConfig, get_peft_model

    # exact module paths, not kinds: a leaf name like "c_proj" may also exist outside the decoder blocks
    targets = [m.name.removesuffix(".weight") for m in modules]
    conv1d = any(type(mod).__name__ == "Conv1D" for mod in model.modules())
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=conv1d, bias="none")
    peft_model = get_peft_model(model, lcfg)
    named = [(n, p) for n, p in _named_unique(peft_model) if p.requires_grad]
    for n, p in _named_unique(peft_model):
        if "lora_" not in n:
            p.requires_grad_(False)
    named = [(n, p) for n, p in named if "lora_" in n]
    opt = ActiveAdamW(named, **opt_kw)
    m = Method("lora", peft_model, modules, opt, period=cfg.period, fixed=[n for n, _ in named])
    m.begin_period(0)
    return m
