"""CPU benchmark: MISA (δ = 3%) against full AdamW on SmolLM2-135M, batch 4 x 256 tokens, fp32.

    python benchmarks/bench_cpu.py [--steps 5] [--warmup 2] [--repeats 2] [--out bench_cpu.json]

Each (method, repeat) runs in its own child process, so the peak resident set size (getrusage ru_maxrss)
belongs to that method alone; methods alternate within a repeat so slow drift of a shared machine hits
both. A step is exactly what the trainer does per optimizer step (begin_period, forward, backward,
after_backward, clip, AdamW over the active set); the batch is fixed random tokens of full length, so
padding cannot flatter either side. Reported: median step time over the measured steps (after warm-up),
then the median over repeats; peak RSS the median over repeats. Targets: MISA step time <= 0.7x full,
MISA peak RSS <= 0.6x full.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_TIME, TARGET_RSS = 0.7, 0.6


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(method: str, steps: int, warmup: int, batch: int, seq: int, delta: float, threads: int,
           from_config: str | None = None, ckpt: bool = False) -> dict:
    """Time ``warmup + steps`` training steps of one method in this process; return the measurements.

    ``from_config``: a model folder/config.json to build *randomly initialised* (same architecture, same
    time and memory; for machines without the embedded weights)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from misa_train import lean_ops
    from misa_train.config import TrainConfig
    from misa_train.methods import build_method
    from misa_train.models import load_model
    from misa_train.modules import count_parameters, find_modules
    from misa_train.train import enable_checkpointing, forward_loss

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, delta=delta, period=20, lr=1e-5, device="cpu", dtype="fp32",
                      grad_checkpointing=ckpt)
    if from_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(from_config), dtype=torch.float32)
    else:
        model, _ = load_model(None, dtype=torch.float32, device="cpu")
    model.config.use_cache = False
    modules = find_modules(model)
    if cfg.lean_ops and not ckpt:  # as train.run does
        lean_ops.patch_model(model)
    total = count_parameters(model)
    m = build_method(cfg, model, modules, total)
    if ckpt:
        enable_checkpointing(model, m.model)
    m.model.train()
    rss_loaded = _rss_mb()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times, losses = [], []
    for s in range(warmup + steps):
        m.begin_period(s)
        t0 = time.perf_counter()
        loss = forward_loss(m.model, inputs, sharded=False)  # the trainer's loss: chunked, no full logits
        loss.backward()
        m.after_backward()
        m.clip_grad_norm_(1.0)
        m.step(cfg.lr)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    st = m.stats()
    return {"method": method, "step_times_s": times[warmup:], "median_step_s": statistics.median(times[warmup:]),
            "peak_rss_mb": _rss_mb(), "rss_after_load_mb": rss_loaded, "active_params": st["active_params"],
            "total_params": total, "threads": torch.get_num_threads(), "losses": losses}


def _child(args: argparse.Namespace, method: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--delta", str(args.delta),
           "--threads", str(args.threads)] + (["--from-config", args.from_config] if args.from_config else []) \
        + (["--grad-checkpointing"] if args.grad_checkpointing else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"bench_cpu: error: {method} worker failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print a table, write JSON to --out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (allocator, caches)")
    p.add_argument("--repeats", type=int, default=2, help="child processes per method")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--delta", type=float, default=0.03, help="MISA budget fraction")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child; 0 = torch's default")
    p.add_argument("--methods", default="misa,full", help="comma-separated methods to compare")
    p.add_argument("--out", default="bench_cpu.json", help="JSON results file")
    p.add_argument("--from-config", default=None,
                   help="build this model config with random weights instead of loading SmolLM2's")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing for every method")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.batch, args.seq, args.delta,
                                args.threads, args.from_config, args.grad_checkpointing)))
        return 0
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for m in methods:
            res = _child(args, m)
            runs[m].append(res)
            print(f"repeat {r + 1}/{args.repeats} {m:5s}: median step {res['median_step_s']:.3f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary = {m: {"median_step_s": statistics.median(x["median_step_s"] for x in rs),
                   "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
                   "rss_after_load_mb": statistics.median(x["rss_after_load_mb"] for x in rs),
                   "active_params": rs[0]["active_params"]} for m, rs in runs.items()}
    print(f"\n{'method':8s} {'step s':>8s} {'peak RSS MB':>12s} {'active params':>14s}")
    for m, s in summary.items():
        print(f"{m:8s} {s['median_step_s']:8.3f} {s['peak_rss_mb']:12.0f} {s['active_params']:14,d}")
    ratios = {}
    if "misa" in summary and "full" in summary:
        ratios = {"step_time": summary["misa"]["median_step_s"] / summary["full"]["median_step_s"],
                  "peak_rss": summary["misa"]["peak_rss_mb"] / summary["full"]["peak_rss_mb"]}
        print(f"\nMISA / full: step time {ratios['step_time']:.2f}x (target <= {TARGET_TIME}), "
              f"peak RSS {ratios['peak_rss']:.2f}x (target <= {TARGET_RSS})")
    out = {"config": vars(args) | {"worker": None}, "summary": summary, "ratios": ratios, "runs": runs,
           "targets": {"step_time": TARGET_TIME, "peak_rss": TARGET_RSS},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
