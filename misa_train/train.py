"""The training loop: one function, ``run(cfg) -> summary``, the same for every method.

``run`` validates the config once and runs three phases that share one :class:`_Run` record:

* :func:`_setup` - run folder and checkpoint (misa_train.run_folder) -> seed -> model + modules -> method ->
  data -> (restore the checkpoint) -> config.json and metrics.jsonl -> evaluate before -> importance probe;
* :func:`_train` - per optimizer step :func:`_train_step`, then :func:`_log` and
  :func:`_maybe_eval_and_save` when due;
* :func:`_finish` - last partial period, evaluate after, then the result files (:func:`_write_results`).

Per optimizer step, nothing waits for the device except one boolean: whether the step's loss is finite
(needed *before* the update to skip a bad step; on CPU it costs nothing). The loss itself is accumulated
on the device and read once per ``log_every`` steps; the squared gradient norms of the active modules
are read once per period by the method.

SIGINT / SIGTERM: the current step finishes, a checkpoint is written, the metrics are flushed and the
run returns with ``exit_code`` 130 (SIGINT) or 143 (SIGTERM), the shell conventions for "stopped by
that signal", so a scheduler can tell an interrupted run from a finished one (exit 0).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from misa_train import checkpoint as ckpt_mod
from misa_train import distributed, report, run_folder
from misa_train.config import (
    ConfigError,
    TrainConfig,
    check_resume_compatible,
    validate_against_model,
)


class RunStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss with on_nan=stop); the message says why."""


# ---------------------------------------------------------------------- small helpers
def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available (else mps, else cpu); anything else as given."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec} requested but CUDA is not available")
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA (the memory MISA saves is the point there), fp32 elsewhere (CPU bf16 is slow)."""
    if spec == "bf16" or (spec == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - some libraries draw from the global numpy state
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to 10% of ``lr`` at ``max_steps``."""
    warm = min(cfg.warmup_steps, max(cfg.max_steps - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(cfg.max_steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    floor = 0.1 * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max_memory_allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def world_size() -> int:
    """Processes in the job (torchrun's WORLD_SIZE; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _SignalStop:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (handlers restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalStop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now", not "after this step"
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _max_positions(model: torch.nn.Module) -> int | None:
    """The model's longest sequence from its config (``max_position_embeddings`` or ``n_positions``), or None."""
    c = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ---------------------------------------------------------------------- data and evaluation glue
def build_data(cfg: TrainConfig, tokenizer: Any, model_config: Any = None) -> tuple[Any, list, list]:
    """(train Batches, encoded validation set, validation examples for generation accuracy)."""
    from misa_train import data

    try:
        bundle = data.prepare_data(cfg.data, tokenizer, task=cfg.task, max_seq_len=cfg.max_seq_len,
                                   val_fraction=cfg.val_fraction, seed=cfg.seed, n_train=cfg.n_train,
                                   n_val=cfg.n_val, model_config=model_config, allow_hub=cfg.data_hub)
    except ValueError as e:  # unreadable file, unknown schema, too little text: the user's data
        raise ConfigError(f"data: {e}") from None
    batches = data.Batches(bundle.train, cfg.batch_size, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id,
                           shuffle=True, repeat=True)
    return batches, bundle.val, bundle.val_examples


def _val_loss(cfg: TrainConfig, model: Any, tokenizer: Any, val_enc: list) -> dict[str, float] | None:
    """Held-out loss/perplexity over the first ``eval_batches`` validation batches (fixed order)."""
    from misa_train import data, evaluate

    if not val_enc:
        return None
    val = data.Batches(val_enc, cfg.batch_size, seed=0, pad_token_id=tokenizer.pad_token_id,
                       shuffle=False, repeat=False)
    return evaluate.eval_loss(model, val, max_batches=cfg.eval_batches)


def _gen_accuracy(cfg: TrainConfig, model: Any, tokenizer: Any, val_ex: list) -> dict[str, Any] | None:
    """Greedy-generation answer accuracy on the first ``gen_eval_examples`` validation items."""
    from misa_train import evaluate

    items = val_ex[: cfg.gen_eval_examples]
    if not items:
        return None
    return evaluate.answer_accuracy(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=max(cfg.batch_size, 8), n_samples=2)


def _before_after(summary: dict[str, Any]) -> str:
    """One line: held-out loss and answer accuracy before → after (what a user looks at first)."""
    def fmt(v: Any, pct: bool = False) -> str:
        return "n/a" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.4f}")
    return (f"held-out loss {fmt(summary.get('val_loss_start'))} -> {fmt(summary.get('val_loss_end'))}, "
            f"answer accuracy {fmt(summary.get('accuracy_before'), True)} -> "
            f"{fmt(summary.get('accuracy_after'), True)}, {summary.get('steps')} steps, "
            f"{fmt(summary.get('tokens_per_s'))} tokens/s")


PROBE_TOKENS = 512  # sequence cut of the importance probe's batch


def enable_checkpointing(model: torch.nn.Module, net: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of ``net`` (``model`` unwrapped).

    Non-reentrant checkpointing needs no input that requires grad, so backward still stops below the lowest
    layer that has a trainable module (``enable_input_require_grads`` would force it down to the embeddings,
    costing LISA/BAdam/MISA the recompute and backward of every frozen layer below).  The KV cache is useless
    in training and clashes with recomputation.
    """
    if hasattr(model, "config"):
        model.config.use_cache = False
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers (5.x) adds the input-requires-grad hook itself for any model fed input_ids; take it off again
    for m in {net, model}:
        if hasattr(m, "disable_input_require_grads"):
            m.disable_input_require_grads()


def forward_loss(net: torch.nn.Module, batch: dict[str, Any], sharded: bool) -> torch.Tensor:
    """Mean next-token NLL of ``batch`` by the chunked loss (no full logits), on one process and under FSDP.

    Under FSDP the loss must run inside the root module's call, whose hooks gather the sharded embedding, final
    norm and head and reduce their gradients: the chunked loss stands in for the root's forward for this one
    call.  Per rank it returns sum_local/(n_global/world) (``num_items_in_batch``, from ``local_batch``), so
    FSDP's average over ranks is the global mean.  Models the chunked loss does not cover use their own
    forward and loss (full logits)."""
    from misa_train.losses import chunk_parts, loss_labels, model_loss, parts_loss

    if not sharded:
        return model_loss(net, batch)
    parts = chunk_parts(net)
    if parts is None:
        return net(**batch).loss
    n_items = batch.get("num_items_in_batch")  # absent without labels: then the local mean
    inputs = {k: v for k, v in batch.items() if k != "num_items_in_batch"}

    def chunked_forward(**b: Any) -> torch.Tensor:
        labels = loss_labels(b)
        mean = parts_loss(parts, b, labels)
        if n_items is None:
            return mean
        targets = (labels[:, 1:] != -100).sum()
        return torch.where(targets > 0, mean * targets, torch.zeros_like(mean)) / n_items.to(mean.device)

    net.forward = chunked_forward  # an instance attribute: Module.__call__ (and FSDP's hooks) run it
    try:
        return net(**inputs)
    finally:
        del net.forward


# ---------------------------------------------------------------------- the run's shared state
@dataclasses.dataclass
class _Meter:
    """Loss and throughput: per log interval (read and restarted by :meth:`take`) and totals over the run."""

    pending: list[torch.Tensor] = dataclasses.field(default_factory=list)  # finite steps' losses, on device
    tokens: int = 0  # tokens fed since the interval began (finite steps or not)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    tokens_total: int = 0
    time_total: float = 0.0
    step_times: list[float] = dataclasses.field(default_factory=list)  # seconds per step, one per interval
    last_loss: float | None = None

    def restart(self) -> None:
        """Start the interval's clock afresh: evaluation and checkpointing are not training throughput."""
        self.started = time.perf_counter()

    def take(self) -> tuple[list[float], float, float]:
        """(per-step losses, seconds per step, tokens/s) of the interval, then start the next one.

        The losses are read from the device here, once per interval. Call only with ``pending`` non-empty."""
        losses = torch.stack(self.pending).float().cpu().tolist()
        seconds = time.perf_counter() - self.started
        per_step = seconds / len(self.pending)
        tok_s = self.tokens / seconds if seconds > 0 else float("nan")
        self.step_times.append(per_step)
        self.tokens_total += self.tokens
        self.time_total += seconds
        self.last_loss = sum(losses) / len(losses)
        self.pending.clear()
        self.tokens = 0
        self.restart()
        return losses, per_step, tok_s


@dataclasses.dataclass
class _Run:
    """What the phases of one run share: built by :func:`_setup`, advanced by :func:`_train`."""

    cfg: TrainConfig  # device and dtype made concrete
    dist: distributed.Dist
    reporter: Any  # misa_train.report on rank 0, a do-nothing stand-in elsewhere
    run_dir: Path
    device: torch.device
    net: torch.nn.Module  # what trains and is saved: the model, or its peft wrapper
    tokenizer: Any
    modules: list  # find_modules' ModuleInfo list
    method: Any  # misa_train.methods.Method
    batches: Any  # the training data.Batches (an endless, resumable stream)
    val_enc: list
    val_ex: list
    start_step: int
    log: Any = None  # report.MetricsLog
    pbar: Any = None
    meter: _Meter = dataclasses.field(default_factory=_Meter)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------- the run
def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train according to ``cfg`` (validated here) and return a summary dict.

    Summary keys: run_dir, method, steps, start_step, train_loss, val_loss_start, val_loss_end,
    accuracy_before, accuracy_after, tokens_per_s, step_time_s (median over log intervals), peak_mem_mb,
    stats (method.stats()), exit_code (0, or 130/143 after SIGINT/SIGTERM), stopped (reason or None).
    Under torchrun (WORLD_SIZE > 1) every rank runs this; see misa_train/distributed.py.
    Raises ConfigError for bad input (also found after the model loads) and RunStopped (on_nan=stop).
    """
    return run_validated(dataclasses.replace(cfg).validate())  # a copy: validation converts types in place


def run_validated(cfg: TrainConfig) -> dict[str, Any]:
    """:func:`run` for a ``cfg`` that :meth:`TrainConfig.validate` (or ``load_config``) has just checked: the
    CLI validates before torch is imported, so bad input fails fast, and does not validate again here."""
    from misa_train import losses

    losses.set_default_backend(cfg.loss_backend)
    dist = distributed.setup(cfg)
    failed = True
    try:  # the process group is closed whatever happens, so no peer waits on a dead rank
        summary = _run(cfg, dist, distributed.reporter(dist, report))
        failed = False
        return summary
    finally:
        dist.close(failed=failed)


def _run(cfg: TrainConfig, dist: distributed.Dist, reporter: Any) -> dict[str, Any]:
    """Body of :func:`run` for a validated ``cfg``: set up, train, finish."""
    r = _setup(cfg, dist, reporter)
    step = _train(r)
    return _finish(r, step)


# ---------------------------------------------------------------------- set-up
def _setup(cfg: TrainConfig, dist: distributed.Dist, reporter: Any) -> _Run:
    """Run folder, model, method, data and (when resuming) their saved state; then the log, evaluation at
    step 0 and the importance probe of a fresh run."""
    run_dir, ckpt = run_folder.resolve_run(cfg, announce=dist.is_main)
    run_dir = dist.broadcast(run_dir)  # a default run folder name holds rank 0's timestamp
    run_folder.prepare_run_dir(run_dir, fresh=ckpt is None, writer=dist.is_main)
    if ckpt is not None:  # before the model loads: an incompatible checkpoint is an input error
        meta = ckpt_mod.read_meta(ckpt)
        check_resume_compatible(cfg, meta.get("config", {}),
                                distributed.resumable_world(meta, world_size(), ckpt), world_size())
    device = dist.device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    cfg = dataclasses.replace(cfg, device=str(device), dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    seed_everything(cfg.seed)
    model, tokenizer, modules, total_params = _setup_model(cfg, dist, device, dtype)
    method = _setup_method(cfg, dist, model, modules, total_params)
    batches, val_enc, val_ex = build_data(cfg, tokenizer, getattr(model, "config", None))
    start_step = 0
    if ckpt is not None:
        start_step = _restore(dist, ckpt, method, batches)
        reporter.truncate_metrics(run_dir / "metrics.jsonl", start_step)
    r = _Run(cfg=cfg, dist=dist, reporter=reporter, run_dir=run_dir, device=device, net=method.model,
             tokenizer=tokenizer, modules=modules, method=method, batches=batches, val_enc=val_enc,
             val_ex=val_ex, start_step=start_step)
    _start_log(r, ckpt, total_params)
    if start_step == 0:
        _evaluate(r, 0)
    if ckpt is None and cfg.probe_importance:
        _probe(r)
    return r


def _setup_model(cfg: TrainConfig, dist: distributed.Dist, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.nn.Module, Any, list, int]:
    """(model, tokenizer, modules, total_params): loaded, sharded under FSDP, lean ops patched, and checked
    against ``cfg`` (budget vs module sizes, layer counts, positions)."""
    from misa_train import lean_ops
    from misa_train.models import load_model
    from misa_train.modules import count_parameters, find_modules

    try:
        model, tokenizer = load_model(cfg.model, dtype=dtype, device=dist.load_device(device))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    model = dist.shard(model, dtype, device)
    modules = find_modules(model)
    if cfg.lean_ops and cfg.compile_ops:
        # fused lean ops (torch.compile): as lean, fewer kernels; with checkpointing too, whose recompute runs
        # the forward again (docs/trainer.md); compiled and checked here, one-line ConfigError on failure
        from misa_train import fused_ops

        fused_ops.patch_model(model)
    elif cfg.lean_ops and not cfg.grad_checkpointing:
        # same outputs, less saved for backward; with checkpointing only layer inputs are saved, so the lean
        # ops would cost speed (measured on H100: -12% tok/s) for no memory (docs/results.md)
        lean_ops.patch_model(model)
    total_params = count_parameters(model)
    validate_against_model(cfg, modules, total_params, _max_positions(model))
    return model, tokenizer, modules, total_params


def _setup_method(cfg: TrainConfig, dist: distributed.Dist, model: torch.nn.Module, modules: list,
                  total_params: int) -> Any:
    """The training method (its ``.model`` is what trains), in train mode, checkpointing applied."""
    from misa_train.methods import build_method

    method = build_method(cfg, model, modules, total_params)
    method.allreduce = dist.allreduce_sum  # sharded grads: each rank's sq norms are partial sums
    if cfg.grad_checkpointing:
        enable_checkpointing(model, method.model)
    method.model.train()
    return method


def _restore(dist: distributed.Dist, ckpt: Path, method: Any, batches: Any) -> int:
    """Load checkpoint ``ckpt`` into the model, the method, the data stream and the RNGs; return its step.

    A file that passed checkpoint_problem's structural check can still fail to load (damage inside it);
    that is reported as a one-line ConfigError naming the checkpoint."""
    from safetensors import SafetensorError

    try:
        if distributed.is_dcp_checkpoint(ckpt):
            method_state, trainer_state = dist.load_checkpoint(ckpt, method.model, method)
        else:
            method_state, trainer_state = ckpt_mod.load_checkpoint(ckpt, method.model)
        method.load_state_dict(method_state)
        batches.load_state_dict(trainer_state["data"])
        ckpt_mod.set_rng_state(trainer_state["rng"])
        return int(trainer_state["step"])
    except ConfigError:
        raise
    # the boundary where saved bytes become objects: whatever they fail with is a damaged checkpoint
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"resume: cannot load checkpoint {ckpt}: {text}") from None


def _start_log(r: _Run, ckpt: Path | None, total_params: int) -> None:
    """Write config.json, open metrics.jsonl with a ``start`` event, set up the summary, say where it runs."""
    cfg, n_mod = r.cfg, len(r.modules)
    r.reporter.write_json(r.run_dir / "config.json", {
        **cfg.to_dict(), "total_params": total_params, "n_modules": n_mod,
        "module_params": sum(m.size for m in r.modules), "world_size": world_size(),
        "resumed_from": str(ckpt) if ckpt is not None else None,
    })
    r.log = r.reporter.MetricsLog(r.run_dir / "metrics.jsonl", tensorboard=cfg.report_to == "tensorboard")
    r.log.log("start", r.start_step, resumed_from=str(ckpt) if ckpt else None, device=str(r.device),
              total_params=total_params, n_modules=n_mod)
    r.summary = {"run_dir": str(r.run_dir), "method": cfg.method, "start_step": r.start_step, "exit_code": 0,
                 "stopped": None, "val_loss_start": None, "accuracy_before": None}
    if r.dist.is_main:
        print(f"misa_train: run folder {r.run_dir} ({cfg.method}, {r.device}, {cfg.dtype}, "
              f"{total_params / 1e6:.1f}M params, {n_mod} modules, world {r.dist.world})",
              file=sys.stderr, flush=True)


def _probe(r: _Run) -> None:
    """The method's importance probe (one extra backward) on a peek at the first batch."""
    # peeked, so the data order stays as without the probe; cut short: importance needs a gradient
    # direction, not a long context, and a short batch bounds the probe's activation memory
    before = r.batches.state_dict()
    batch = next(r.batches)
    r.batches.load_state_dict(before)
    batch = {k: v[:, :PROBE_TOKENS] for k, v in batch.items()}
    batch = {k: v.to(r.device) for k, v in r.dist.local_batch(batch).items()}
    if r.method.probe_importance(lambda: forward_loss(r.net, batch, r.dist.sharded)):
        r.log.log("probe", 0, tokens=int(batch["input_ids"].numel()))


# ---------------------------------------------------------------------- the loop
def _train(r: _Run) -> int:
    """Optimizer steps from ``r.start_step`` until ``max_steps`` or a stop signal; returns the last step."""
    from tqdm.auto import tqdm

    cfg = r.cfg
    r.pbar = tqdm(total=cfg.max_steps, initial=r.start_step, disable=not cfg.progress or not r.dist.is_main,
                  desc=cfg.method, dynamic_ncols=True, file=sys.stderr)
    batches = iter(r.batches)
    step = r.start_step
    r.meter.restart()
    with _SignalStop() as raw_stop:
        stop = distributed.AgreedStop(raw_stop, r.dist)  # every rank stops at the same step
        while step < cfg.max_steps:
            _begin_period(r, step)
            if not _train_step(r, batches, step):
                _on_non_finite(r, step)
            step += 1
            r.pbar.update(1)
            stop.agree()
            if step % cfg.period == 0:
                r.method.end_period()
            stopping = stop.signum is not None
            if step % cfg.log_every == 0 or stopping or _save_due(cfg, step):
                _log(r, step)
            _maybe_eval_and_save(r, step, stopping)
            if stopping:
                _record_signal_stop(r, step, stop.signum)
                break
    r.pbar.close()
    return step


def _begin_period(r: _Run, step: int) -> None:
    """Let the method draw a new active set when a period starts, and log it."""
    # full/lora pick their one fixed set in build_method; log it once so the heatmap has a column
    if r.method.begin_period(step) or step == 0:
        active = np.flatnonzero(r.method.active_mask()).tolist()
        r.dist.check_same_active(active)
        r.log.log("period", step, active=active, active_params=r.method.stats().get("active_params"))


def _train_step(r: _Run, batches: Any, step: int) -> bool:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward, then the update if the mean
    loss is finite. Returns whether it was; a non-finite step's gradients are dropped, nothing updated."""
    cfg, dist = r.cfg, r.dist
    step_loss = torch.zeros((), device=r.device)
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        r.meter.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        batch = {k: v.to(r.device, non_blocking=True) for k, v in dist.local_batch(batch).items()}
        loss = forward_loss(r.net, batch, dist.sharded) / cfg.grad_accum
        loss.backward()
        step_loss += loss.detach().float()
    step_loss = dist.mean(step_loss)  # all ranks take the same skip decision and log the global loss
    if not bool(torch.isfinite(step_loss)):  # the one per-step sync; see the module docstring
        for p in r.net.parameters():
            p.grad = None
        return False
    r.method.after_backward()
    if cfg.clip_grad > 0:
        r.method.clip_grad_norm_(cfg.clip_grad)
    r.method.step(lr_at(step, cfg))
    r.meter.pending.append(step_loss)
    return True


def _on_non_finite(r: _Run, step: int) -> None:
    """Log a skipped non-finite step; with ``on_nan=stop`` flush the log and raise RunStopped."""
    r.log.log("nan", step + 1, action=r.cfg.on_nan)
    if r.cfg.on_nan == "stop":
        _log(r, step)
        r.log.log("stop", step, reason="non-finite loss")
        r.log.close()
        r.pbar.close()
        raise RunStopped(f"non-finite loss at step {step + 1}; run folder {r.run_dir} "
                         f"(on_nan=skip would skip such steps)")


def _save_due(cfg: TrainConfig, step: int) -> bool:
    """Whether a checkpoint is written after ``step``: every ``save_every`` steps and at the last step."""
    return bool(cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps


def _log(r: _Run, step: int) -> None:
    """One ``train`` event for the steps since the last: per-step losses, lr, tokens/s, step time, memory."""
    if not r.meter.pending:
        return
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)  # honest timing: the interval's kernels are done
    losses, step_time, tok_s = r.meter.take()
    stats = r.method.stats()
    r.log.log("train", step, loss=r.meter.last_loss, losses=losses, lr=lr_at(step - 1, r.cfg), tokens_per_s=tok_s,
              step_time_s=step_time, peak_mem_mb=peak_memory_mb(r.device),
              active_params=stats.get("active_params"), state_bytes=stats.get("state_bytes"))
    r.pbar.set_postfix(loss=f"{r.meter.last_loss:.4f}", tok_s=f"{tok_s:.0f}")


def _maybe_eval_and_save(r: _Run, step: int, stopping: bool) -> None:
    """Evaluate every ``eval_every`` steps (the last step's evaluation is the final one, in :func:`_finish`);
    checkpoint when due or when a signal stops the run."""
    cfg = r.cfg
    if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
        _evaluate(r, step)
        r.meter.restart()
    if _save_due(cfg, step) or stopping:
        _save(r, step)
        r.meter.restart()


def _evaluate(r: _Run, step: int, final: bool = False) -> None:
    """Held-out loss (and, at step 0 and at the end, generation accuracy) as an ``eval`` event."""
    cfg = r.cfg
    # no RNG is consumed here (fixed validation order, greedy decoding), so evaluation never shifts
    # the training stream: a resumed run matches an uninterrupted one whatever eval_every is
    with torch.no_grad():
        ev = _val_loss(cfg, r.net, r.tokenizer, r.val_enc)
        rec: dict[str, Any] = {"val_loss": None if ev is None else ev["loss"],
                               "val_ppl": None if ev is None else ev["ppl"]}
        if (step == 0 or final) and cfg.gen_eval_examples > 0:
            acc = _gen_accuracy(cfg, r.net, r.tokenizer, r.val_ex)
            if acc is not None:
                rec.update(accuracy=acc["accuracy"], accuracy_n=acc["n"], samples=acc["samples"])
    r.net.train()
    r.log.log("eval", step, final=final, **rec)
    if step == 0 and not final:
        r.summary["val_loss_start"], r.summary["accuracy_before"] = rec["val_loss"], rec.get("accuracy")
    if final:
        r.summary["val_loss_end"], r.summary["accuracy_after"] = rec["val_loss"], rec.get("accuracy")


def _save(r: _Run, step: int) -> None:
    """Write checkpoint ``step`` and log it. A folder that cannot be written ends the run with a one-line
    ConfigError; the metrics so far and the checkpoints written before stay as they are."""
    cfg = r.cfg
    saver = r.dist.save_checkpoint if r.dist.sharded else ckpt_mod.save_checkpoint
    try:
        path = saver(
            r.run_dir, step, model=r.net, adapter_only=(cfg.method == "lora"),
            method_state=r.method.state_dict(),
            trainer_state={"step": step, "data": r.batches.state_dict(), "rng": ckpt_mod.rng_state()},
            meta={"config": cfg.to_dict(), "world_size": world_size()},
            keep_last=cfg.keep_last)
    except OSError as e:
        r.log.log("stop", step, reason=f"checkpoint not written: {e.strerror or e}")
        r.log.close()
        r.pbar.close()
        raise ConfigError(f"output_dir: cannot write checkpoint step {step} in {r.run_dir / ckpt_mod.CKPT_DIR} "
                          f"({e.strerror or e}); metrics.jsonl and earlier checkpoints are kept") from None
    r.log.log("checkpoint", step, path=str(path))


def _record_signal_stop(r: _Run, step: int, signum: int) -> None:
    """Mark the run stopped by ``signum`` (exit code 128 + signum) after its checkpoint was saved."""
    name = signal.Signals(signum).name
    r.summary["stopped"] = name
    r.summary["exit_code"] = 128 + signum
    r.log.log("stop", step, reason=name)
    if r.dist.is_main:
        print(f"misa_train: {name} received; checkpoint saved at step {step} in {r.run_dir}",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the end
def _finish(r: _Run, step: int) -> dict[str, Any]:
    """Close the last period and evaluate (unless a signal stopped the run), log ``end``, write the result
    files; returns the summary."""
    if r.summary["stopped"] is None:
        if step % r.cfg.period != 0:
            r.method.end_period()  # the last, partial period still informs the final importance scores
        _evaluate(r, step, final=True)
    summary = r.summary
    summary.update({
        "steps": step, "train_loss": r.meter.last_loss,
        "tokens_per_s": r.meter.tokens_total / r.meter.time_total if r.meter.time_total > 0 else None,
        "step_time_s": float(np.median(r.meter.step_times)) if r.meter.step_times else None,
        "peak_mem_mb": peak_memory_mb(r.device), "stats": r.method.stats(),
    })
    summary.setdefault("val_loss_end", None)
    summary.setdefault("accuracy_after", None)
    r.log.log("end", step, **{k: v for k, v in summary.items() if k not in ("run_dir", "stats")})
    r.log.close()
    _write_results(r, step)
    if r.dist.is_main:
        print(f"misa_train: {_before_after(summary)}", file=sys.stderr, flush=True)
        print(f"misa_train: done, run folder {r.run_dir}", file=sys.stderr, flush=True)
        print(str(r.run_dir), flush=True)
    return summary


def _write_results(r: _Run, step: int) -> None:
    """The run's result files: importance.json, loss.png / active.png, then summary.json, written last so
    that its presence marks a run folder whose every result file is in place."""
    sampler = getattr(r.method, "sampler", None)
    r.reporter.write_importance(r.run_dir / "importance.json", r.modules,
                                None if sampler is None else np.asarray(sampler.scores).tolist(),
                                extra={"method": r.cfg.method, "step": step})
    try:
        r.reporter.plot_run(r.run_dir, [m.name for m in r.modules])
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
        print(f"misa_train: warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr)
    if r.summary["stopped"] is None:  # collective under FSDP: every rank takes part in the gather
        from misa_train.hf_export import save_run_output

        r.summary["hf_dir"] = save_run_output(r.cfg, r.net, r.tokenizer, r.run_dir, sharded=r.dist.sharded,
                                              is_main=r.dist.is_main)
    r.reporter.write_json(r.run_dir / "summary.json", r.summary)
