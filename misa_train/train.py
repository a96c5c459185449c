"""The training loop: one function, ``run(cfg) -> summary``, the same for every method.

Read top to bottom it is: resolve the run (fresh or resumed) -> seed -> model + modules -> method ->
data -> (restore checkpoint) -> evaluate before -> loop over optimizer steps -> evaluate after -> report.

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
from misa_train import distributed, report
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
                                   n_val=cfg.n_val, model_config=model_config, allow_hub=cfg.data_hub)  # hook
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


# ---------------------------------------------------------------------- the run
def _resolve_run(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None) from output_dir and resume."""
    ckpt: Path | None = None
    if cfg.resume == "auto":
        if cfg.output_dir:
            ckpt = ckpt_mod.resolve_checkpoint(cfg.output_dir)
        else:  # the newest run folder of this method with a checkpoint
            runs = sorted(Path("runs").glob(f"*-{cfg.method}*")) if Path("runs").is_dir() else []
            for r in reversed(runs):
                ckpt = ckpt_mod.resolve_checkpoint(r)
                if ckpt is not None:
                    break
        # 'auto' with nothing to resume starts fresh: the same command line works for the first launch
    elif cfg.resume:
        ckpt = ckpt_mod.resolve_checkpoint(cfg.resume)
        if ckpt is None:
            raise ConfigError(f"resume: no checkpoint in {cfg.resume}")
    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    elif ckpt is not None:
        run_dir = ckpt_mod.run_dir_of(ckpt)
    else:
        run_dir = report.default_run_dir(cfg.method)
    return run_dir, ckpt


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


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train according to ``cfg`` (validated here too) and return a summary dict.

    Summary keys: run_dir, method, steps, start_step, train_loss, val_loss_start, val_loss_end,
    accuracy_before, accuracy_after, tokens_per_s, step_time_s (median over log intervals), peak_mem_mb,
    stats (method.stats()), exit_code (0, or 130/143 after SIGINT/SIGTERM), stopped (reason or None).
    Under torchrun (WORLD_SIZE > 1) every rank runs this; see misa_train/distributed.py.
    """
    dist = distributed.setup(dataclasses.replace(cfg).validate())
    failed = True
    try:  # the process group is closed whatever happens, so no peer waits on a dead rank
        summary = _run(cfg, dist, distributed.reporter(dist, report))
        failed = False
        return summary
    finally:
        dist.close(failed=failed)


def _run(cfg: TrainConfig, dist: distributed.Dist, report: Any) -> dict[str, Any]:
    """Body of :func:`run`; ``report`` is the report module on rank 0 and a no-op stand-in elsewhere."""
    from tqdm.auto import tqdm

    from misa_train import lean_ops
    from misa_train.methods import build_method
    from misa_train.models import load_model
    from misa_train.modules import count_parameters, find_modules

    cfg = dataclasses.replace(cfg).validate()
    from misa_train import losses  # hook: the loss implementation (misa_train/losses.py)
    losses.set_default_backend(cfg.loss_backend)
    run_dir, ckpt = _resolve_run(cfg)
    run_dir = dist.broadcast(run_dir)  # a default run folder name holds rank 0's timestamp
    try:  # before the model loads: an unusable folder is an input error, not minutes of work lost at the end
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create the run folder {run_dir}: {e.strerror or e}") from None
    if ckpt is not None:
        meta = ckpt_mod.read_meta(ckpt)
        check_resume_compatible(cfg, meta.get("config", {}),
                                distributed.resumable_world(meta, world_size(), ckpt), world_size())

    device = dist.device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    cfg = dataclasses.replace(cfg, device=str(device), dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    seed_everything(cfg.seed)

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
    method = build_method(cfg, model, modules, total_params)
    method.allreduce = dist.allreduce_sum  # sharded grads: each rank's sq norms are partial sums
    net = method.model
    if cfg.grad_checkpointing:
        enable_checkpointing(model, net)
    net.train()

    train_batches, val_enc, val_ex = build_data(cfg, tokenizer, getattr(model, "config", None))

    start_step = 0
    if ckpt is not None:
        if distributed.is_dcp_checkpoint(ckpt):
            method_state, trainer_state = dist.load_checkpoint(ckpt, net, method)
        else:
            method_state, trainer_state = ckpt_mod.load_checkpoint(ckpt, net)
        method.load_state_dict(method_state)
        train_batches.load_state_dict(trainer_state["data"])
        ckpt_mod.set_rng_state(trainer_state["rng"])
        start_step = int(trainer_state["step"])
        report.truncate_metrics(run_dir / "metrics.jsonl", start_step)
    report.write_json(run_dir / "config.json", {
        **cfg.to_dict(), "total_params": total_params, "n_modules": len(modules),
        "module_params": sum(m.size for m in modules), "world_size": world_size(),
        "resumed_from": str(ckpt) if ckpt is not None else None,
    })
    log = report.MetricsLog(run_dir / "metrics.jsonl", tensorboard=cfg.report_to == "tensorboard")  # hook
    log.log("start", start_step, resumed_from=str(ckpt) if ckpt else None, device=str(device),
            total_params=total_params, n_modules=len(modules))
    if dist.is_main:
        print(f"misa_train: run folder {run_dir} ({cfg.method}, {device}, {cfg.dtype}, "
              f"{total_params / 1e6:.1f}M params, {len(modules)} modules, world {dist.world})",
              file=sys.stderr, flush=True)

    summary: dict[str, Any] = {"run_dir": str(run_dir), "method": cfg.method, "start_step": start_step,
                               "exit_code": 0, "stopped": None, "val_loss_start": None,
                               "accuracy_before": None}

    def evaluate_now(step: int, final: bool = False) -> None:
        # no RNG is consumed here (fixed validation order, greedy decoding), so evaluation never shifts
        # the training stream: a resumed run matches an uninterrupted one whatever eval_every is
        with torch.no_grad():
            ev = _val_loss(cfg, net, tokenizer, val_enc)
            rec: dict[str, Any] = {"val_loss": None if ev is None else ev["loss"],
                                   "val_ppl": None if ev is None else ev["ppl"]}
            if (step == 0 or final) and cfg.gen_eval_examples > 0:
                acc = _gen_accuracy(cfg, net, tokenizer, val_ex)
                if acc is not None:
                    rec.update(accuracy=acc["accuracy"], accuracy_n=acc["n"], samples=acc["samples"])
        net.train()
        log.log("eval", step, final=final, **rec)
        if step == 0 and not final:
            summary["val_loss_start"], summary["accuracy_before"] = rec["val_loss"], rec.get("accuracy")
        if final:
            summary["val_loss_end"], summary["accuracy_after"] = rec["val_loss"], rec.get("accuracy")

    def save(step: int) -> Path:
        saver = dist.save_checkpoint if dist.sharded else ckpt_mod.save_checkpoint
        path = saver(
            run_dir, step, model=net, adapter_only=(cfg.method == "lora"),
            method_state=method.state_dict(),
            trainer_state={"step": step, "data": train_batches.state_dict(), "rng": ckpt_mod.rng_state()},
            meta={"config": cfg.to_dict(), "world_size": world_size()},
            keep_last=cfg.keep_last)
        log.log("checkpoint", step, path=str(path))
        return path

    if start_step == 0:
        evaluate_now(0)

    # ---------------------------------------------------------------- the loop
    step = start_step
    pending: list[torch.Tensor] = []  # per-step losses on the device, read at the next log
    tokens_since, t_since, interval_steps = 0, time.perf_counter(), 0
    step_times: list[float] = []
    tokens_total, time_total = 0, 0.0
    last_loss: float | None = None
    pbar = tqdm(total=cfg.max_steps, initial=start_step, disable=not cfg.progress or not dist.is_main, desc=cfg.method,
                dynamic_ncols=True, file=sys.stderr)
    batches = iter(train_batches)

    def flush_log(step: int) -> None:
        nonlocal tokens_since, t_since, interval_steps, last_loss, tokens_total, time_total
        if not pending:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # honest timing: the interval's kernels are done
        losses = torch.stack(pending).float().cpu().tolist()  # the one host read of the interval
        pending.clear()
        dt = time.perf_counter() - t_since
        tok_s = tokens_since / dt if dt > 0 else float("nan")
        step_times.append(dt / max(interval_steps, 1))
        tokens_total += tokens_since
        time_total += dt
        last_loss = sum(losses) / len(losses)
        stats = method.stats()
        log.log("train", step, loss=last_loss, losses=losses, lr=lr_at(step - 1, cfg), tokens_per_s=tok_s,
                step_time_s=dt / max(interval_steps, 1), peak_mem_mb=peak_memory_mb(device),
                active_params=stats.get("active_params"), state_bytes=stats.get("state_bytes"))
        pbar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:.0f}")
        tokens_since, interval_steps, t_since = 0, 0, time.perf_counter()

    if ckpt is None and cfg.probe_importance:
        # one batch, peeked (the data order stays as without the probe), cut short: importance needs a
        # gradient direction, not a long context, and a short batch bounds the probe's activation memory
        before = train_batches.state_dict()
        probe = next(train_batches)
        train_batches.load_state_dict(before)
        probe = {k: v[:, :PROBE_TOKENS] for k, v in probe.items()}
        probe = {k: v.to(device) for k, v in dist.local_batch(probe).items()}
        if method.probe_importance(lambda: forward_loss(net, probe, dist.sharded)):
            log.log("probe", 0, tokens=int(probe["input_ids"].numel()))

    with _SignalStop() as raw_stop:
        stop = distributed.AgreedStop(raw_stop, dist)  # every rank stops at the same step
        while step < cfg.max_steps:
            # full/lora pick their one fixed set in build_method; log it once so the heatmap has a column
            if method.begin_period(step) or step == 0:
                active = np.flatnonzero(method.active_mask()).tolist()
                dist.check_same_active(active)
                log.log("period", step, active=active, active_params=method.stats().get("active_params"))
            step_loss = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                tokens_since += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                batch = {k: v.to(device, non_blocking=True) for k, v in dist.local_batch(batch).items()}
                loss = forward_loss(net, batch, dist.sharded) / cfg.grad_accum
                loss.backward()
                step_loss += loss.detach().float()
            step_loss = dist.mean(step_loss)  # all ranks take the same skip decision and log the global loss
            finite = bool(torch.isfinite(step_loss))  # the one per-step sync; see the module docstring
            if finite:
                method.after_backward()
                if cfg.clip_grad > 0:
                    method.clip_grad_norm_(cfg.clip_grad)
                method.step(lr_at(step, cfg))
                pending.append(step_loss)
                interval_steps += 1
            else:
                for p in net.parameters():
                    p.grad = None
                log.log("nan", step + 1, action=cfg.on_nan)
                if cfg.on_nan == "stop":
                    flush_log(step)
                    log.log("stop", step, reason="non-finite loss")
                    log.close()
                    pbar.close()
                    raise RunStopped(f"non-finite loss at step {step + 1}; run folder {run_dir} "
                                     f"(on_nan=skip would skip such steps)")
            step += 1
            pbar.update(1)
            stop.agree()
            if step % cfg.period == 0:
                method.end_period()
            due_save = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps
            if step % cfg.log_every == 0 or due_save or stop.signum is not None or step == cfg.max_steps:
                flush_log(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                evaluate_now(step)
                t_since = time.perf_counter()  # evaluation time is not training throughput
            if due_save or stop.signum is not None:
                save(step)
                t_since = time.perf_counter()
            if stop.signum is not None:
                name = signal.Signals(stop.signum).name
                summary["stopped"] = name
                summary["exit_code"] = 128 + stop.signum
                log.log("stop", step, reason=name)
                if dist.is_main:
                    print(f"misa_train: {name} received; checkpoint saved at step {step} in {run_dir}",
                          file=sys.stderr, flush=True)
                break
    pbar.close()

    if summary["stopped"] is None:
        if step % cfg.period != 0:
            method.end_period()  # the last, partial period still informs the final importance scores
        evaluate_now(step, final=True)
    sampler = getattr(method, "sampler", None)
    report.write_importance(run_dir / "importance.json", modules,
                            None if sampler is None else np.asarray(sampler.scores).tolist(),
                            extra={"method": cfg.method, "step": step})
    stats = method.stats()
    summary.update({
        "steps": step, "train_loss": last_loss,
        "tokens_per_s": tokens_total / time_total if time_total > 0 else None,
        "step_time_s": float(np.median(step_times)) if step_times else None,
        "peak_mem_mb": peak_memory_mb(device), "stats": stats,
    })
    summary.setdefault("val_loss_end", None)
    summary.setdefault("accuracy_after", None)
    log.log("end", step, **{k: v for k, v in summary.items() if k not in ("run_dir", "stats")})
    log.close()
    try:
        report.plot_run(run_dir, [m.name for m in modules])
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
        print(f"misa_train: warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr)
    # ---- hook: HF-loadable output (misa_train/hf_export.py); collective under FSDP, so on every rank
    if summary["stopped"] is None:
        from misa_train.hf_export import save_run_output
        summary["hf_dir"] = save_run_output(cfg, net, tokenizer, run_dir, sharded=dist.sharded, is_main=dist.is_main)
    # ---- end hook
    report.write_json(run_dir / "summary.json", summary)
    if dist.is_main:
        print(f"misa_train: {_before_after(summary)}", file=sys.stderr, flush=True)
        print(f"misa_train: done, run folder {run_dir}", file=sys.stderr, flush=True)
        print(str(run_dir), flush=True)
    return summary
