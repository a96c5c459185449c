"""Peak GPU memory and time of the causal-LM loss, forward + backward, per backend.

    python benchmarks/loss_memory.py [--vocab 128256] [--seq 8192] [--hidden 4096] [--batch 1]
                                     [--dtype bf16] [--train-head] [--repeats 3] [--torch-policies]
                                     [--out loss_memory.json]

Backends: ``chunked`` (misa_train.losses.chunked_causal_lm_loss), ``torch`` (F.linear_cross_entropy with
its chunked options and the mean of its per-token losses taken in fp32, where the installed torch has it;
``--torch-policies`` adds ``torch:bf16mean``, torch's own mean, and ``torch:<acc_policy>`` for each policy)
and ``reference`` (full fp32 logits, the definition). For each, on a fresh CUDA allocator peak: hidden states
(B, S, h) that require grad and an LM head (V, h) (requiring grad with ``--train-head``) are made, the loss and its
backward run, and the reported number is ``max_memory_allocated`` minus what was allocated before the call (inputs
and, after backward, the gradients of what requires grad are included in the peak, the same for every backend).
Time: median of ``--repeats`` synchronised runs after one warm-up. The losses of all backends are checked against
each other, and so are the gradients of the hidden states (relative differences printed).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misa_train.losses import (  # noqa: E402 - the checkout's package, after the path insert
    chunked_causal_lm_loss,
    has_torch_linear_ce,
    reference_causal_lm_loss,
    torch_causal_lm_loss,
)

BACKENDS = {"chunked": chunked_causal_lm_loss, "torch": torch_causal_lm_loss, "reference": reference_causal_lm_loss}
# torch's accumulation policies (LinearCrossEntropyOptions.acc_policy), measured as backends "torch:<policy>"
TORCH_POLICIES = ("compact", "balanced", "accurate")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype, generator=g)
    weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype, generator=g) * args.hidden ** -0.5
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)
    labels[:, : args.seq // 4] = -100  # a masked prompt, as in SFT
    return hidden.requires_grad_(True), weight.requires_grad_(args.train_head), labels


def measure(name: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Peak extra bytes, median seconds and loss value of one backend's forward + backward, and the gradient
    of the hidden states (fp32, on the CPU) for the comparison between backends."""
    base_name, _, policy = name.partition(":")
    fn = BACKENDS[base_name]
    if policy == "bf16mean":
        fn = functools.partial(fn, fp32_mean=False)
    elif policy:
        fn = functools.partial(fn, acc_policy=policy)
    hidden, weight, labels = _inputs(args, device)
    cuda = device.type == "cuda"
    times, peak, loss_value = [], 0, float("nan")
    for i in range(args.repeats + 1):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        t0 = time.perf_counter()
        loss = fn(hidden, weight, labels)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        if i > 0:  # the first run is the warm-up
            times.append(time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base) if cuda else peak
        loss_value = float(loss.detach())
        del loss
    row = {"backend": name, "peak_mib": peak / 2**20 if cuda else float("nan"),
           "median_s": statistics.median(times), "loss": loss_value}
    return row, hidden.grad.float().cpu()


def main(argv: list[str] | None = None) -> int:
    """Parse the shape, measure every available backend, print a table (and write --out). Exit 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--train-head", action="store_true", help="the head matrix requires grad too")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-policies", action="store_true",
                   help="also measure torch's loss under each acc_policy (" + ", ".join(TORCH_POLICIES) + ")")
    p.add_argument("--skip-reference", action="store_true", help="skip the full-logits definition (large shapes)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu runs the same code for a check of the script (no peak memory: reported nan)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("loss_memory: error: needs a CUDA device (peak memory is torch.cuda.max_memory_allocated)",
              file=sys.stderr)
        return 2
    if min(args.vocab, args.seq, args.hidden, args.batch, args.repeats) < 1:
        print("loss_memory: error: vocab, seq, hidden, batch and repeats must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    names = [n for n in BACKENDS if (n != "torch" or has_torch_linear_ce())
             and (n != "reference" or not args.skip_reference)]
    if args.torch_policies and has_torch_linear_ce():
        at = names.index("torch") + 1
        names[at:at] = ["torch:bf16mean"] + [f"torch:{q}" for q in TORCH_POLICIES]
    rows, grads = zip(*(measure(n, args, device) for n in names), strict=True)
    ref, ref_grad = rows[0]["loss"], grads[0]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {where}; V={args.vocab} S={args.seq} "
          f"h={args.hidden} B={args.batch} {args.dtype}, head {'trains' if args.train_head else 'frozen'}")
    print(f"{'backend':<16}{'peak MiB':>12}{'median s':>11}{'loss':>12}{'rel diff':>11}{'grad diff':>11}")
    for r, g in zip(rows, grads, strict=True):
        r["rel_diff_vs_chunked"] = abs(r["loss"] - ref) / max(abs(ref), 1e-12)
        # ‖∇_h − ∇_h(chunked)‖ / ‖∇_h(chunked)‖ over the hidden states' gradient
        r["grad_rel_diff_vs_chunked"] = float((g - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
        print(f"{r['backend']:<16}{r['peak_mib']:>12.1f}{r['median_s']:>11.4f}{r['loss']:>12.5f}"
              f"{r['rel_diff_vs_chunked']:>11.2e}{r['grad_rel_diff_vs_chunked']:>11.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": list(rows)},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
