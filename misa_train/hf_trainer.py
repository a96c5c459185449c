"""MISA inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer``: an optimizer and a callback.

    from misa_train.hf_trainer import MisaCallback, MisaOptimizer

    opt = MisaOptimizer(model, lr=1e-4, delta=0.03, period=20)            # after model.to(device)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None), callbacks=[MisaCallback(opt)])
    trainer.train()                       # trainer.train(resume_from_checkpoint=True) continues exactly

:class:`MisaOptimizer` is a ``torch.optim.Optimizer`` around the trainer's own strategy object
(``misa_train.methods.build_method``): a ``ModuleSampler`` draws, every T optimizer steps, the modules that
train; :class:`~misa_train.optim.ActiveAdamW` holds moments (and fp32 masters for bf16 weights) for those
modules only. Its learning rate is read from ``param_groups[0]["lr"]`` at every step, so any
``torch.optim.lr_scheduler`` (and the Trainer's own schedules) drive it. Its ``state_dict`` is the
strategy's: optimizer moments, active set, period position and the sampler (scores and RNG), so the
Trainer's ``optimizer.pt`` carries the sampler and ``resume_from_checkpoint`` continues the same draws.

:class:`MisaCallback` does what the Trainer cannot know about: the importance probe (one extra backward on
the first batch, so sampling by importance starts at the first draw), the draw at the start of every
period, and activation checkpointing that does not force backward down to the embeddings.

Importance is measured on the gradients ``step()`` sees. The Trainer clips before ``step()``, which rescales
every module of that step alike; to measure before clipping as ``python -m misa_train`` does, set
``max_grad_norm=0`` in the arguments and pass ``clip_grad`` to :class:`MisaOptimizer`.

Distributed: one process, or FSDP through ``python -m misa_train`` (torchrun). Plain DDP is refused: DDP
fixes the set of parameters it all-reduces when it wraps the model, and MISA changes that set every period.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from misa_train.config import TrainConfig, validate_against_model

PROBE_TOKENS = 512  # sequence cut of the probe batch: importance needs a gradient direction, not a context
_LOSS_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


class MisaOptimizer(torch.optim.Optimizer):
    """AdamW over the modules a ``ModuleSampler`` draws every ``period`` steps (state for active ones only).

    Args:
        model: the causal LM (on its training device already; the period's importance accumulator lives there).
        lr: initial learning rate, ``param_groups[0]["lr"]`` (a scheduler changes it there).
        method: "misa" (module-wise draws within the budget δ), "lisa" or "badam" (whole layers).
        delta: budget per period, fraction of the model's parameters, in (0, 1] (method misa).
        period: T, optimizer steps between two draws.
        clip_grad: clip the active gradients to this global norm after measuring importance; 0 = off.
        **options: any further ``TrainConfig`` field the strategy reads (rule, eta, ema_beta, min_inclusion,
            betas, eps, weight_decay, seed, reweight, retain_state, lisa_layers, badam_layers,
            train_embeddings, train_head, train_norms).

    Raises:
        ConfigError: a bad option, or a budget below the model's smallest module (one line naming the field).
    """

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-4, method: str = "misa", delta: float = 0.03,
                 period: int = 20, clip_grad: float = 0.0, **options: Any) -> None:
        from misa_train.methods import SAMPLED, build_method
        from misa_train.modules import count_parameters, find_modules

        cfg = TrainConfig(method=method, lr=lr, delta=delta, period=period, clip_grad=clip_grad, **options)
        cfg.validate()
        if cfg.method not in SAMPLED:
            raise ValueError(f"method: MisaOptimizer samples modules ({', '.join(SAMPLED)}); "
                             f"for {cfg.method} use torch.optim.AdamW or peft")
        modules = find_modules(model)
        total = count_parameters(model)
        validate_against_model(cfg, modules, total)
        self.cfg = cfg
        self.method = build_method(cfg, model, modules, total)
        params = list({id(p): p for p in model.parameters()}.values())  # every parameter, tied ones once
        super().__init__(params, dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay))

    @property
    def started(self) -> bool:
        """Whether a set has been drawn (by :meth:`begin_period` or restored by :meth:`load_state_dict`)."""
        return self.method.started

    def begin_period(self, step: int) -> bool:
        """Draw the next active set when ``step % period == 0`` (or before the first step); True if drawn.

        Call before the forward pass of optimizer step ``step`` (:class:`MisaCallback` does, in
        ``on_step_begin``): the draw decides which parameters require grad."""
        return self.method.begin_period(int(step))

    def probe_importance(self, loss_fn: Callable[[], torch.Tensor]) -> bool:
        """Score every module by ‖g_b‖² from one backward of ``loss_fn()`` before the first draw; True if
        done (see ``Method.probe_importance``)."""
        return self.method.probe_importance(loss_fn)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Accumulate the active modules' ‖g_b‖², clip (``clip_grad``), take one AdamW step at
        ``param_groups[0]["lr"]`` over the active set and drop its gradients. Returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.started:
            raise RuntimeError("MisaOptimizer.step() before any draw: call begin_period(step) before the "
                               "forward pass, or add MisaCallback(optimizer) to the Trainer")
        self.method.after_backward()
        if self.cfg.clip_grad > 0:
            self.method.clip_grad_norm_(self.cfg.clip_grad)
        self.method.step(float(self.param_groups[0]["lr"]))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state (moments, active set, period position, sampler with its RNG) and the
        learning rate; plain Python values and tensors, so ``torch.load(weights_only=True)`` reads it."""
        return {"misa": self.method.state_dict(), "lr": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the saved active set trains again and the next draws are the saved run's."""
        self.method.load_state_dict(state_dict["misa"])
        for group, lr in zip(self.param_groups, state_dict["lr"], strict=True):
            group["lr"] = lr


def _probe_batch(dataloader: Any) -> dict[str, torch.Tensor] | None:
    """The first training batch, cut to ``PROBE_TOKENS``, without moving the torch RNG the data order uses."""
    if dataloader is None:
        return None
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(dataloader), None)
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    out = {k: v[:, :PROBE_TOKENS] for k, v in batch.items() if k in _LOSS_KEYS and torch.is_tensor(v)}
    out.setdefault("labels", out["input_ids"])
    return out


def _check_not_plain_ddp(args: Any) -> None:
    """Refuse several processes without FSDP (see the module docstring)."""
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1 and not getattr(args, "fsdp", None):
        raise ValueError(f"MisaCallback: {world} processes with plain DDP are not supported (DDP fixes the "
                         "parameters it all-reduces when it wraps the model; MISA changes them every period); "
                         "train on one process, or use torchrun -m misa_train (FSDP2)")


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether transformers turned activation checkpointing on (the attribute was renamed in 5.x)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class MisaCallback(_callback_base()):
    """``transformers.TrainerCallback`` that drives a :class:`MisaOptimizer` inside ``Trainer.train()``.

    on_train_begin: refuse plain DDP; make activation checkpointing non-reentrant without input gradients
    (so backward stops at the lowest active layer); on a fresh run, probe importance on the first batch.
    on_step_begin: ``optimizer.begin_period(global_step)``, which draws at every period boundary (a resumed
    run draws exactly where the uninterrupted one did). The sampler state travels in the optimizer's
    ``state_dict`` (Trainer's ``optimizer.pt``).

    Args:
        optimizer: the :class:`MisaOptimizer` given to the Trainer.
        probe_importance: run the probe on a fresh run (the trainer's default).
    """

    def __init__(self, optimizer: MisaOptimizer, probe_importance: bool = True) -> None:
        if not isinstance(optimizer, MisaOptimizer):
            raise TypeError(f"MisaCallback needs a MisaOptimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.probe = bool(probe_importance)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        """Checks, checkpointing fix-up and the importance probe (fresh runs only)."""
        _check_not_plain_ddp(args)
        if model is not None and _checkpointing(model):
            from misa_train.train import enable_checkpointing

            # the Trainer's input-grad hook first: enabling again registers a new one and forgets its handle
            model.disable_input_require_grads()
            enable_checkpointing(model, model)
        if self.probe and not self.optimizer.started and model is not None:
            batch = _probe_batch(train_dataloader)
            if batch is not None:
                from misa_train.losses import model_loss

                device = next(model.parameters()).device
                batch = {k: v.to(device) for k, v in batch.items()}
                self.optimizer.probe_importance(lambda: model_loss(model, batch))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Draw the period's modules at ``global_step % period == 0`` (before the step's forward)."""
        self.optimizer.begin_period(state.global_step)
