"""Residuals of the peak-memory model against the committed GPU measurements, and (on a GPU) where they come from.

Default (no torch, no GPU): recompute ``misa_theory.memory.predict_peak`` for every measured row of the bench
outputs in docs/results (the draws each row recorded, max over draws, as benchmarks/bench_gpu.py does) and
print, per row, the measured peak, the prediction recorded at measurement time and the prediction of the
model as it is now, then max |err| per method. Exit status 1 when a row is off by more than ``--tol`` %.

    python benchmarks/memory_residuals.py                  # table + summary
    python benchmarks/memory_residuals.py --json out.json  # also machine-readable

``--measure`` (needs torch, transformers and a CUDA device) runs training steps with the bench's set-up and
reports the peak of each *point* of a step next to the model's points (Estimate.points): the
``torch.cuda.max_memory_allocated`` peak is read and reset at the boundaries forward | loss node | layers |
embedding backward | optimizer step (tensor hooks on the decoder output and the embedding output).
``--out-of-place-head-grad`` also runs each with the loss node's earlier ``(grad_w * grad_out)`` product (a
runtime patch restoring the code before the in-place product) to show which bytes that temporary held.

    python benchmarks/memory_residuals.py --measure llama3.2-1b:lisa:1024:off llama3-8b:lisa:1024:off --out o.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.bench_grid import ARCHS, METHODS, predict_kwargs  # noqa: E402  (torch-free)
from misa_theory import memory as mm  # noqa: E402

FILES = ("bench_8b.json", "bench_1b.json", "bench_8b_misa1_long.json", "lean_on_1024.json", "lean_off_1024.json",
         "lean_on_8192.json", "lean_off_8192.json",
         # compile_ops, the checkpointing fix, depth_bias and the probe (docs/results.md)
         "lean_compiled_1024.json", "lean_compiled_8192.json", "lean_off_1024_b.json", "lean_off_8192_b.json",
         "long_compiled_1024.json", "long_off_1024.json", "long_compiled_8192.json", "long_off_8192.json",
         "fix_compiled_8192.json", "fix_off_8192.json", "fix_compiled_8192_misa3.json", "fix_badam_8192.json",
         "db2_compiled_1024.json", "db4_compiled_1024.json", "db2_compiled_8192.json",
         "p_compiled_1024.json", "p_compiled_1024_rep.json", "p_db2_compiled_1024.json", "p_compiled_8192.json")


def _kw(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    method, over = METHODS[row["method"]]
    return method, predict_kwargs(row, over)


def predict_row(row: dict[str, Any]) -> mm.Estimate:
    """The model's estimate for a bench row: max over the draws it recorded (benchmarks/bench_gpu.py)."""
    method, kw = _kw(row)
    draws = row.get("draws") or [None]
    ests = [mm.predict_peak(ARCHS[row["model"]], method, active=None if d is None else [tuple(x) for x in d], **kw)
            for d in draws]
    return max(ests, key=lambda e: e.peak_bytes)


def residuals(files: Iterable[Path]) -> list[dict[str, Any]]:
    """One record per measured row (OOM rows have no measurement and are skipped)."""
    out = []
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            if not r.get("peak_bytes"):
                continue
            e = predict_row(r)
            out.append({"file": Path(f).name, "model": r["model"], "method": r["method"], "seq": r["seq"],
                        "ckpt": r["ckpt"], "lean_ops": bool(r.get("lean_ops", False)),
                        "measured_gib": r["peak_bytes"] / mm.GIB,
                        "recorded_pred_gib": r.get("pred_gib"), "recorded_err_pct": r.get("pred_err_pct"),
                        "pred_gib": e.peak_gib, "err_pct": 100.0 * (e.peak_bytes - r["peak_bytes"]) / r["peak_bytes"],
                        "phase": e.phase,
                        "point": max(e.points, key=e.points.__getitem__)})
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """max |err| per method, recorded (at measurement time) and now."""
    s: dict[str, dict[str, float]] = {}
    for r in rows:
        d = s.setdefault(r["method"], {"rows": 0, "recorded_max_abs_err_pct": 0.0, "max_abs_err_pct": 0.0})
        d["rows"] += 1
        if r["recorded_err_pct"] is not None:
            d["recorded_max_abs_err_pct"] = max(d["recorded_max_abs_err_pct"], abs(r["recorded_err_pct"]))
        d["max_abs_err_pct"] = max(d["max_abs_err_pct"], abs(r["err_pct"]))
    return s


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("| file | model | method | seq | ckpt | lean | peak GiB | recorded model GiB | recorded err % | "
          "model GiB (now) | err % (now) | point (now) |")
    print("|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        rec = "–" if r["recorded_pred_gib"] is None else f"{r['recorded_pred_gib']:.2f}"
        rerr = "–" if r["recorded_err_pct"] is None else f"{r['recorded_err_pct']:+.1f}"
        print(f"| {r['file']} | {r['model']} | {r['method']} | {r['seq']} | {'on' if r['ckpt'] else 'off'} | "
              f"{'on' if r['lean_ops'] else 'off'} | {r['measured_gib']:.2f} | {rec} | {rerr} | "
              f"{r['pred_gib']:.2f} | {r['err_pct']:+.1f} | {r['point']} |")


# ---------------------------------------------------------------------------------------------- GPU points
def measure(spec: str, *, steps: int = 3, inplace_head_grad: bool = True, lean: bool = False) -> dict[str, Any]:
    """Peak of each point of a training step on the current CUDA device, next to the model's points.

    ``spec``: ``model:method:seq:ckpt`` (ckpt on|off), names as in benchmarks/bench_gpu.py. Peaks are the max over
    ``steps`` steps (period 2, as the bench) of ``max_memory_allocated`` between two boundaries.
    """
    import torch

    from benchmarks.bench_gpu import build_model
    from misa_train import lean_ops, losses
    from misa_train.config import TrainConfig
    from misa_train.losses import model_loss
    from misa_train.methods import build_method
    from misa_train.modules import count_parameters, find_modules
    from misa_train.train import enable_checkpointing

    model_name, meth_name, seq_s, ck_s = spec.split(":")
    seq, ckpt = int(seq_s), ck_s == "on"
    arch = ARCHS[model_name]
    method, over = METHODS[meth_name]
    dev = torch.device("cuda")
    orig_bw = losses._ChunkedLinearCE.backward
    if not inplace_head_grad:
        def bw(ctx, grad_out):  # the same gradients, the fp32 product a new V×h tensor (the earlier form)
            grad_h, grad_w = ctx.saved_tensors
            gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
            gw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
            return gh, gw, None, None, None
        losses._ChunkedLinearCE.backward = staticmethod(bw)
    seg: dict[str, int] = {}

    def mark(name: str) -> None:
        seg[name] = max(seg.get(name, 0), int(torch.cuda.max_memory_allocated(dev)))
        torch.cuda.reset_peak_memory_stats(dev)

    torch.cuda.empty_cache()
    try:
        model = build_model({**arch, "rope_theta": 500000.0, "max_position_embeddings": max(8192, seq)}, dev,
                       torch.bfloat16)
        modules = find_modules(model)
        lean_on = lean and lean_ops.patch_model(model) > 0
        total = count_parameters(model)
        cfg = TrainConfig(method=method, period=2, grad_checkpointing=ckpt, max_seq_len=seq, batch_size=1, lr=1e-5,
                          warmup_steps=0, max_steps=steps, **over)
        m = build_method(cfg, model, modules, total)
        net = m.model
        if ckpt:
            enable_checkpointing(model, net)
        net.train()
        base = net.get_base_model() if hasattr(net, "get_base_model") else net
        flags = {"emb": False}

        def on_dec(_m, _i, out):
            hs = out.last_hidden_state
            if hs.requires_grad:
                hs.register_hook(lambda g: mark("backward_loss"))

        def on_emb(_m, _i, out):
            if out.requires_grad:
                flags["emb"] = True
                out.register_hook(lambda g: mark("backward_layers"))

        hooks = [base.get_decoder().register_forward_hook(on_dec),
                 base.get_input_embeddings().register_forward_hook(on_emb)]
        gen = torch.Generator(device="cpu").manual_seed(1)
        draws = []
        torch.cuda.reset_peak_memory_stats(dev)
        for step in range(steps):
            ids = torch.randint(0, arch["vocab_size"], (1, seq), generator=gen).to(dev)
            m.begin_period(step)
            mark("begin_period")
            flags["emb"] = False
            loss = model_loss(net, {"input_ids": ids})
            mark("forward_end")
            loss.backward()
            mark("backward_embedding" if flags["emb"] else "backward_layers")
            m.after_backward()
            m.clip_grad_norm_(1.0)
            m.step(1e-5)
            if (step + 1) % 2 == 0:
                m.end_period()
            del loss
            mark("optimizer_step")
            if method in ("misa", "lisa", "badam"):
                draws.append([[modules[i].layer, modules[i].kind] for i in m.active_indices()])
        for hk in hooks:
            hk.remove()
        row = {"model": model_name, "method": meth_name, "seq": seq, "batch": 1, "ckpt": ckpt, "lean_ops": lean_on,
               "draws": draws, "inplace_head_grad": inplace_head_grad}
        _, kw = _kw(row)
        pts: dict[str, int] = {}
        for d in draws or [None]:
            e = mm.predict_peak(arch, method, active=None if d is None else [tuple(x) for x in d], **kw)
            for k, v in e.points.items():
                pts[k] = max(pts.get(k, 0), v)
        return {"spec": spec, "inplace_head_grad": inplace_head_grad, "lean_ops": lean_on, "draws": draws,
                "measured_gib": {k: v / mm.GIB for k, v in seg.items()},
                "model_gib": {k: v / mm.GIB for k, v in pts.items()},
                "vh_gib": arch["vocab_size"] * arch["hidden_size"] / mm.GIB,
                "device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    finally:
        losses._ChunkedLinearCE.backward = orig_bw
        for k in ("model", "m", "net", "base"):
            locals().pop(k, None)
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "docs" / "results"), help="folder of the bench JSON files")
    p.add_argument("--tol", type=float, default=10.0, help="exit 1 when some |err| exceeds this (percent)")
    p.add_argument("--json", default=None, help="also write the rows and the summary here")
    p.add_argument("--measure", nargs="*", default=None, metavar="MODEL:METHOD:SEQ:CKPT",
                   help="GPU: measure the peak of each point of a step for these configurations")
    p.add_argument("--out-of-place-head-grad", action="store_true", help="with --measure: also run each with "
                   "the loss node's earlier out-of-place head-gradient product")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="with --measure: JSON output")
    a = p.parse_args(argv)
    if a.measure is not None:
        res = []
        for spec in a.measure:
            for inplace in ([True, False] if a.out_of_place_head_grad else [True]):
                r = measure(spec, steps=a.steps, inplace_head_grad=inplace)
                res.append(r)
                print(f"{spec}{'' if inplace else ' (out-of-place head grad)'}  [V·h = {r['vh_gib']:.3f} GiB]")
                for k in ("begin_period", "forward_end", "backward_loss", "backward_layers", "backward_embedding",
                          "optimizer_step"):
                    meas, mod = r["measured_gib"].get(k), r["model_gib"].get(k)
                    ms = "–" if meas is None else f"{meas:7.2f}"
                    md = "–" if not mod else f"{mod:7.2f}"
                    print(f"  {k:20s} measured {ms:>7} GiB   model {md:>7} GiB")
                if a.out:
                    Path(a.out).write_text(json.dumps(res, indent=1))
        return 0
    rows = residuals(Path(a.results) / f for f in FILES if (Path(a.results) / f).exists())
    _print_table(rows)
    s = summary(rows)
    print()
    print("| method | rows | max abs err % (recorded) | max abs err % (now) |")
    print("|---|---:|---:|---:|")
    for meth, d in s.items():
        print(f"| {meth} | {d['rows']} | {d['recorded_max_abs_err_pct']:.1f} | {d['max_abs_err_pct']:.1f} |")
    worst = max(rows, key=lambda r: abs(r["err_pct"]))
    print(f"\n{len(rows)} measured rows; max |err| now {abs(worst['err_pct']):.1f}% ({worst['model']} "
          f"{worst['method']} seq {worst['seq']} ckpt {'on' if worst['ckpt'] else 'off'})")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": s}, indent=1))
    return 0 if abs(worst["err_pct"]) <= a.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
