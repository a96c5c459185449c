"""Memory/throughput benchmark of the trainer's methods on random-initialised Llama architectures.

    python benchmarks/bench_gpu.py --models llama3-8b --methods misa1,misa3,badam,lisa,lora,full \
        --seqs 1024,4096,8192 --ckpt both --steps 6 --out docs/results
    python benchmarks/bench_gpu.py --quick --out /tmp/bench      # tiny model on CPU (what the test runs)

Each configuration runs in this process, one after the other: build the model (``from_config`` on the
device, bf16, SDPA attention), ``find_modules`` + ``build_method`` exactly as ``misa_train.train.run`` does
(so LoRA is peft, the sampled methods use ModuleSampler and ActiveAdamW), then warm-up steps and timed
steps of the trainer's step: ``begin_period`` -> forward + chunked cross-entropy (losses.model_loss) ->
backward -> ``after_backward`` -> clip to 1.0 -> ``step`` -> ``end_period`` every T steps. With T = 2 the
timed steps cross sampler switches (state freed and allocated), as in a real run.

Measured per configuration:
* peak: ``torch.cuda.max_memory_allocated`` from after the model is built to the last step (the stats are
  reset per configuration; everything is freed and the cache emptied between configurations);
* tokens/s: batch·seq / median step time (``cuda.synchronize`` + ``perf_counter`` around each step);
* MFU: misa_theory.memory.flops_per_token (method-matched forward + backward model FLOPs, no recompute)
  × tokens/s / the device's dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM);
* the memory model's prediction (max over the draws seen) and its relative error.
A CUDA out-of-memory is caught and reported as OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.bench_grid import ARCHS, METHODS, predict_kwargs  # noqa: E402
from misa_theory import memory as mm  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(arch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**arch, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def run_one(model_name: str, method_name: str, seq: int, ckpt: bool, *, steps: int, warmup: int,
            period: int, device: torch.device, batch: int = 1, lean: bool | str = True,
            depth_bias: float = 0.0) -> dict[str, Any]:
    """One configuration: build, warm up, time; returns the row (never raises on CUDA OOM).

    ``lean``: "on" (or True) = misa_train.lean_ops, "compiled" = misa_train.fused_ops (compiled and checked
    before the peak statistics are reset; ``compile_s`` is that time), "off" (or False) = HF's ops. Unlike
    the trainer, the bench applies the choice with and without checkpointing."""
    # the previous row's model may sit in reference cycles (patched forwards): free it before measuring
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from misa_train import fused_ops, lean_ops
    from misa_train.config import ConfigError, TrainConfig
    from misa_train.losses import model_loss
    from misa_train.methods import build_method
    from misa_train.modules import count_parameters, find_modules
    from misa_train.train import PROBE_TOKENS, enable_checkpointing

    arch = ARCHS[model_name]
    method, over = METHODS[method_name]
    mode = "on" if lean is True else "off" if lean is False else str(lean)
    row: dict[str, Any] = {"model": model_name, "method": method_name, "seq": seq, "batch": batch,
                           "ckpt": ckpt, "status": "ok", "lean_mode": mode}
    if method == "misa" and depth_bias:
        over = {**over, "depth_bias": depth_bias}
        row["depth_bias"] = depth_bias
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    state: dict[str, Any] = {}
    try:
        model = build_model(arch, device, dtype)
        state["model"] = model
        modules = find_modules(model)
        if mode == "compiled":
            rep: dict[str, Any] = {}
            # strict=False: a compiled op saving more than the eager lean op is reported, not fatal
            row["lean_ops"] = fused_ops.patch_model(model, rows_hint=batch * seq, strict=False, report=rep) > 0
            row.update(compile_s=rep.get("seconds"), compile_graphs=rep.get("graphs"),
                       fused_saved_bytes=rep.get("saved"), fused_as_lean=rep.get("lean"))
            if rep and not rep.get("lean"):
                print(f"bench: compiled ops save more than the lean ops: {rep['saved']}", file=sys.stderr)
        else:  # the memory model's lean_ops flag (TrainConfig.lean_ops)
            row["lean_ops"] = mode == "on" and lean_ops.patch_model(model) > 0
        total = count_parameters(model)
        cfg = TrainConfig(method=method, period=period, grad_checkpointing=ckpt, max_seq_len=seq,
                          batch_size=batch, lr=1e-5, warmup_steps=0, max_steps=warmup + steps, **over)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # the same set-up sequence as misa_train.train.run
        m = build_method(cfg, model, modules, total)
        state["method"] = m
        net = m.model
        if ckpt:
            enable_checkpointing(model, net)
        net.train()
        gen = torch.Generator(device="cpu").manual_seed(1)
        if cfg.probe_importance:
            # as train.run: one short all-module backward, so the timed draws follow the sampling rule rather
            # than the exploration cycle; a one-off, so it is kept out of the peak and the timing
            probe = torch.randint(0, arch["vocab_size"], (batch, min(seq, PROBE_TOKENS)), generator=gen)
            row["probed"] = m.probe_importance(lambda: model_loss(net, {"input_ids": probe.to(device)}))
            if device.type == "cuda":
                row["probe_peak_gib"] = torch.cuda.max_memory_allocated(device) / mm.GIB
                torch.cuda.reset_peak_memory_stats(device)
        times, draws, losses, warm_times = [], [], [], []
        graphs0 = None
        for step in range(warmup + steps):
            if step == warmup:
                graphs0 = fused_ops.compiled_graphs()
            ids = torch.randint(0, arch["vocab_size"], (batch, seq), generator=gen).to(device)
            _sync(device)
            t0 = time.perf_counter()
            m.begin_period(step)
            loss = model_loss(net, {"input_ids": ids})
            loss.backward()
            if bool(torch.isfinite(loss.detach())):
                m.after_backward()
                m.clip_grad_norm_(1.0)
                m.step(1e-5)
            if (step + 1) % period == 0:
                m.end_period()
            _sync(device)
            dt = time.perf_counter() - t0
            losses.append(float(loss.detach()))
            del loss
            if method in ("misa", "lisa", "badam"):
                idx = m.active_indices()
                draws.append([[modules[i].layer, modules[i].kind] for i in idx])
            if step >= warmup:
                times.append(dt)
            else:
                warm_times.append(dt)
        graphs1 = fused_ops.compiled_graphs()
        # Dynamo graphs compiled during the timed steps (0 = no compilation in the timing)
        row["timed_compiles"] = None if graphs0 is None or graphs1 is None else graphs1 - graphs0
        row["warmup_step_times"] = warm_times
        med = statistics.median(times)
        # steps that open a period pay for the draw and the state (de)allocation; a real run has T ~ 20
        steady = [t for k, t in enumerate(times) if (warmup + k) % period != 0] or times
        row.update(step_s=med, tokens_per_s=batch * seq / med, step_times=times,
                   tokens_per_s_steady=batch * seq / statistics.median(steady),
                   loss_first=losses[0], loss_last=losses[-1],
                   total_params=total, active_params=m.stats()["active_params"])
        if device.type == "cuda":
            row["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            row["peak_gib"] = row["peak_bytes"] / mm.GIB
        row["draws"] = draws
    except torch.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).splitlines()[0][:200])
    except ConfigError as e:  # fused_ops: torch.compile failed or its result did not check out
        row.update(status="error", error=str(e))
        print(f"bench: {e}", file=sys.stderr)
    finally:
        state.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["inplace_head_grad"] = True  # the chunked loss's backward scales its saved head gradient in place
    _predict(row, arch, method, over, batch)
    return row


def _predict(row: dict[str, Any], arch: dict[str, Any], method: str, over: dict[str, Any], batch: int) -> None:
    """Memory-model prediction (max over the recorded draws) and FLOP-based MFU."""
    kw = predict_kwargs({**row, "batch": batch}, over)
    draws = row.get("draws") or [None]
    ests = [mm.predict_peak(arch, method, active=None if d is None else [tuple(x) for x in d], **kw)
            for d in draws]
    est = max(ests, key=lambda e: e.peak_bytes)
    row["pred_gib"] = est.peak_gib
    row["pred_phase"] = est.phase
    row["pred_breakdown_gib"] = {k: v / mm.GIB for k, v in est.breakdown.items()}
    if row.get("peak_bytes"):
        row["pred_err_pct"] = 100.0 * (est.peak_bytes - row["peak_bytes"]) / row["peak_bytes"]
    if row.get("tokens_per_s"):
        fl = []
        for d in draws:
            act = None if d is None else [tuple(x) for x in d]
            low = 0
            if method in ("misa", "badam") and act and not row["ckpt"]:
                low = min(layer for layer, _ in act)
            fl.append(mm.flops_per_token(arch, method, seq=row["seq"], delta=kw["delta"],
                                         lisa_layers=kw["lisa_layers"], badam_layers=kw["badam_layers"],
                                         lora_r=kw["lora_r"], active=act, lowest_graph_layer=low))
        row["flops_per_token"] = float(np.mean(fl))


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<12} {'method':<6} {'seq':>5} {'ckpt':>4} {'peak GiB':>9} {'pred GiB':>9} {'err %':>6} "
            f"{'tok/s':>8} {'MFU %':>6}  phase")
    out = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else ("OOM" if r["status"] == "OOM" else "-")
        err = f"{r['pred_err_pct']:+.1f}" if r.get("pred_err_pct") is not None else "-"
        tok = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-"
        out.append(f"{r['model']:<12} {r['method']:<6} {r['seq']:>5} {'on' if r['ckpt'] else 'off':>4} "
                   f"{peak:>9} {r['pred_gib']:>9.2f} {err:>6} {tok:>8} {mfu:>6}  {r.get('pred_phase', '')}")
    return "\n".join(out)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench's numbers matter more than its picture
        return
    ok = [r for r in rows if r.get("peak_gib") is not None or r["status"] == "OOM"]
    if not ok:
        ok = rows
    labels = [f"{r['model'][:8]} {r['method']} {r['seq']}{'c' if r['ckpt'] else ''}" for r in ok]
    x = np.arange(len(ok))
    fig, ax = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(ok)), 8), sharex=True)
    meas = [r.get("peak_gib") or 0.0 for r in ok]
    ax[0].bar(x - 0.2, meas, 0.4, label="measured peak")
    ax[0].bar(x + 0.2, [r["pred_gib"] for r in ok], 0.4, label="memory model", alpha=0.7)
    for j, r in enumerate(ok):
        if r["status"] == "OOM":
            ax[0].text(j, 1, "OOM", rotation=90, ha="center", fontsize=7)
    ax[0].set_ylabel("GiB")
    ax[0].legend()
    ax[1].bar(x, [r.get("tokens_per_s") or 0.0 for r in ok])
    ax[1].set_ylabel("tokens/s")
    ax[1].set_xticks(x, labels, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python benchmarks/bench_gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama3-8b,llama3.2-1b", help=f"comma list of {list(ARCHS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--seqs", default="1024,4096,8192")
    p.add_argument("--ckpt", default="both", choices=("on", "off", "both"))
    p.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--period", type=int, default=2, help="T: steps between draws")
    p.add_argument("--out", default="bench_out", help="folder for bench.json and bench.png")
    p.add_argument("--tag", default="bench", help="file name stem of the outputs")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, seq 32, every method")
    p.add_argument("--lean-ops", default="on", choices=("on", "off", "compiled"),
                   help="activation-lean SwiGLU/RMSNorm: on = misa_train.lean_ops (TrainConfig.lean_ops), "
                        "compiled = the torch.compile'd fused variant misa_train.fused_ops (lean_ops + "
                        "compile_ops; compiled before the timing, at least 2 warm-up steps), off = HF's ops; "
                        "applied with and without --ckpt")
    p.add_argument("--depth-bias", type=float, default=0.0,
                   help="TrainConfig.depth_bias for the misa rows (0 = the paper's sampling)")
    p.add_argument("--loss-backend", default="chunked", choices=("chunked", "torch", "auto"),
                   help="TrainConfig.loss_backend: chunked (misa_train.losses) or torch's F.linear_cross_entropy")
    a = p.parse_args(argv)
    if a.depth_bias < 0:
        print("bench: --depth-bias must be >= 0", file=sys.stderr)
        return 2
    if a.quick:
        models, seqs, device = ["tiny"], [32], torch.device("cpu")
        steps, warmup = min(a.steps, 3), 1
    else:
        models = a.models.split(",")
        seqs = [int(s) for s in a.seqs.split(",")]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        steps, warmup = a.steps, a.warmup
    if a.lean_ops == "compiled" and warmup < 2:
        warmup = 2  # the compiled graphs exist before step 0; the first steps still pay one-off costs
    methods = a.methods.split(",")
    for name, known in ((models, ARCHS), (methods, METHODS)):
        bad = [x for x in name if x not in known]
        if bad:
            print(f"bench: unknown {bad}; known: {list(known)}", file=sys.stderr)
            return 2
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[a.ckpt]
    from misa_train.config import ConfigError
    from misa_train.losses import set_default_backend

    try:
        set_default_backend(a.loss_backend)
    except ConfigError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": _git_commit(),
            "argv": sys.argv[1:] if argv is None else argv, "peak_bf16_flops": _peak_flops(device),
            "steps": steps, "warmup": warmup, "period": a.period, "lean_ops": a.lean_ops,
            "loss_backend": a.loss_backend}
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        meta["peft"] = None
    rows: list[dict[str, Any]] = []
    for model_name in models:
        for seq in seqs:
            for ck in ckpts:
                for meth in methods:
                    t0 = time.perf_counter()
                    r = run_one(model_name, meth, seq, ck, steps=steps, warmup=warmup, period=a.period,
                                device=device, lean=a.lean_ops, depth_bias=a.depth_bias)
                    pk = meta["peak_bf16_flops"]
                    if pk and r.get("tokens_per_s") and r.get("flops_per_token"):
                        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / pk
                    r["wall_s"] = time.perf_counter() - t0
                    rows.append(r)
                    extra = f", compile {r['compile_s']:.0f}s" if r.get("compile_s") is not None else ""
                    print(_table([r]).splitlines()[-1], f" ({r['wall_s']:.0f}s{extra})", flush=True)
                    # rewrite after each row: a run cut short by a time limit still leaves its numbers
                    (out / f"{a.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(_table(rows))
    _plot(rows, out / f"{a.tag}.png")
    errs = [abs(r["pred_err_pct"]) for r in rows if r.get("pred_err_pct") is not None]
    if errs:
        print(f"\nmemory model: max |err| {max(errs):.1f}%, mean |err| {sum(errs) / len(errs):.1f}% "
              f"over {len(errs)} measured rows")
    if any(r["status"] == "error" for r in rows):
        return 1
    if os.environ.get("BENCH_FAIL_ON_NAN") and any(not math.isfinite(r.get("loss_last", 0.0)) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
