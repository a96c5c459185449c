"""``python -m misa_theory``: simulate sampling rules on synthetic problems, or compare sampling variances.

Commands
--------
``simulate``  K block updates (α = α₀/√K) of each rule on a problem, many seeds; prints a table, writes
              ``summary.json`` and ``grad_sq.png`` into ``--out``.  ``--K-sweep 100,1000,10000`` runs several
              horizons and fits the log-log slope of (1/K)Σ‖∇f(θ_k)‖² per rule (``rate.png``).
``variance``  E‖ĝ−g‖² = Σ a_b(1/π_b − 1) of the unbiased block estimator for layer-/module-wise designs on
              measured norms (``--norms FILE.json``) or a synthetic Llama-3-8B profile (``--toy llama3-8b``).

Bad input gives one line ``misa_theory: error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

if TYPE_CHECKING:
    from .problems import Problem
    from .simulate import SimConfig, SimResult

PROG = "misa_theory"
TOYS = ("llama3-8b",)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``misa_theory: error: <first line of message>`` on stderr and exit with code 2."""
    line = str(message).strip().splitlines()[0] if str(message).strip() else "invalid input"
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of both sub-commands (defaults are the ones docs/simulator.md reports)."""
    from .problems import PROBLEMS
    from .simulate import ALL_RULES

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("simulate", help="run block-coordinate Adam with a sampling rule on a synthetic problem")
    s.add_argument("--problem", choices=sorted(PROBLEMS), default="robust")
    s.add_argument("--rule", default="all",
                   help=f"'all' or a comma list of {', '.join(ALL_RULES)}")
    s.add_argument("--K", type=int, default=1000, help="block updates (periods of T steps); α = α₀/√K")
    s.add_argument("--K-sweep", type=_int_list, default=None, dest="K_sweep",
                   help="comma list of horizons; fits the slope of (1/K)Σ‖∇f‖² against K")
    s.add_argument("--seeds", type=int, default=10)
    s.add_argument("--seed", type=int, default=0, help="base seed (noise and samplers)")
    s.add_argument("--T", type=int, default=5, help="inner Adam steps per block update")
    s.add_argument("--alpha0", type=float, default=0.3, help="α = α₀/√K")
    s.add_argument("--sgd-alpha0", type=float, default=None, help="α₀ of the sgd baseline (default: --alpha0)")
    s.add_argument("--delta", type=float, default=0.25, help="budget fraction δ in (0, 1]")
    s.add_argument("--eta", type=float, default=1.0, help="softmax temperature η ≥ 0 of misa")
    s.add_argument("--sigma", type=float, default=0.05, help="gradient noise std σ (E‖ξ‖² = σ²)")
    s.add_argument("--heterogeneity", type=float, default=2.0, help="exponent on the importance profile")
    s.add_argument("--keep-state", action="store_true", help="keep Adam state of modules drawn again")
    s.add_argument("--momentum-flush", action="store_true", help="flush momentum at the end of each period")
    s.add_argument("--target-frac", type=float, default=0.1,
                   help="report block updates until ‖∇f(θ_k)‖² ≤ frac·‖∇f(θ_0)‖² (first hit, mean over seeds)")
    s.add_argument("--out", type=Path, default=None, help="folder for summary.json and PNG plots")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--jobs", type=int, default=1,
                   help="processes to use: several (horizon, rule) runs go to a pool of that many; a single run "
                        "with --jobs ≥ 2 puts its sampler in a second process; results do not depend on it")

    v = sub.add_parser("variance", help="layer-wise vs module-wise sampling variance on given norms")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--norms", type=Path, help="JSON with sizes, layers and squared norms (see docs)")
    src.add_argument("--toy", choices=TOYS)
    v.add_argument("--delta", type=float, default=0.03, help="budget fraction δ in (0, 1]")
    v.add_argument("--eta", type=str, default="0,0.5,1,2,4", help="comma list of η for the paper softmax")
    v.add_argument("--seed", type=int, default=0, help="seed of the synthetic profile (--toy)")
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _rules(text: str) -> list[str]:
    from .simulate import ALL_RULES

    if text == "all":
        return list(ALL_RULES)
    rules = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rules if r not in ALL_RULES]
    if bad or not rules:
        fail(f"unknown rule {', '.join(bad) or repr(text)}; choose 'all' or from: {', '.join(ALL_RULES)}")
    return rules


def _check_common(delta: float, eta: float | None = None) -> None:
    if not (0.0 < delta <= 1.0):
        fail(f"--delta must lie in (0, 1], got {delta}")
    if eta is not None and not (eta >= 0 and np.isfinite(eta)):
        fail(f"--eta must be ≥ 0, got {eta}")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # only worth a bar when a run takes seconds; disable=None also hides it when stderr is not a terminal
    return tqdm(total=total, desc=desc, disable=None if total >= 2000 else True, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the ``simulate`` command; returns the exit code."""
    from .problems import make_problem
    from .simulate import SimConfig, alpha_for, block_updates_to_target, rate_fit, simulate, summarize

    rules = _rules(args.rule)
    Ks = args.K_sweep if args.K_sweep is not None else [args.K]
    if any(k <= 0 for k in Ks):
        fail(f"K must be positive, got {min(Ks)}")
    if args.seeds <= 0:
        fail(f"--seeds must be positive, got {args.seeds}")
    if args.T < 1:
        fail(f"--T must be ≥ 1, got {args.T}")
    if not 0 < args.target_frac:
        fail(f"--target-frac must be > 0, got {args.target_frac}")
    if not args.alpha0 > 0:
        fail(f"--alpha0 must be > 0, got {args.alpha0}")
    if args.sigma < 0:
        fail(f"--sigma must be ≥ 0, got {args.sigma}")
    _check_common(args.delta, args.eta)
    if args.out is not None:  # before simulating: a folder that cannot be made is an input error, not lost work
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--out: cannot create {args.out}: {e.strerror or e}")
    problem = make_problem(args.problem, heterogeneity=args.heterogeneity)
    sgd0 = args.sgd_alpha0 if args.sgd_alpha0 is not None else args.alpha0

    if args.jobs < 1:
        fail(f"--jobs must be ≥ 1, got {args.jobs}")

    def config(K: int) -> SimConfig:
        return SimConfig(alpha=alpha_for(K, args.alpha0), T=args.T, delta=args.delta, sigma=args.sigma,
                         eta=args.eta, keep_state=args.keep_state, momentum_flush=args.momentum_flush,
                         sgd_alpha=alpha_for(K, sgd0))

    runs = [(K, r) for K in Ks for r in rules]
    done: dict[tuple[int, str], object] = {}
    bar = _progress(sum(Ks) * len(rules), f"{args.problem}")
    try:
        if args.jobs == 1 or len(runs) == 1:
            for K, r in runs:  # one run with --jobs ≥ 2: its sampler takes the second core (where simulate can)
                done[K, r] = simulate(problem, r, K, args.seeds, config(K), seed=args.seed, progress=bar.update,
                                      sampler_process=args.jobs >= 2)
        else:
            done = _run_parallel(problem, runs, args.seeds, config, args.seed, args.jobs, bar)
    except ValueError as e:  # e.g. a budget smaller than one layer for lisa/badam
        bar.close()
        fail(str(e))
    bar.close()
    results: dict[int, dict] = {K: {r: done[K, r] for r in rules} for K in Ks}

    report: dict = {"problem": args.problem, "n_params": problem.n_params, "n_modules": problem.n_modules,
                    "seeds": args.seeds, "seed": args.seed, "T": args.T, "alpha0": args.alpha0, "delta": args.delta,
                    "eta": args.eta, "sigma": args.sigma, "heterogeneity": args.heterogeneity,
                    "keep_state": args.keep_state, "momentum_flush": args.momentum_flush,
                    "block_update": "one draw followed by T inner Adam steps; K counts block updates",
                    "runs": {str(K): {"alpha": alpha_for(K, args.alpha0),
                                      "rules": {r: summarize(res) for r, res in per.items()}}
                             for K, per in results.items()}}
    print(f"{args.problem}: n={problem.n_params}, M={problem.n_modules}, δ={args.delta}, T={args.T}, "
          f"σ={args.sigma}, α₀={args.alpha0}, seeds={args.seeds}")
    print(f"{'K':>7} {'rule':>8} {'avg ‖∇f‖²':>11} {'± stderr':>9} {'min ‖∇f‖²':>11} {'± stderr':>9} {'f(θ_K)':>9}")
    for K, per in results.items():
        for r, res in per.items():
            s = summarize(res)
            print(f"{K:>7} {r:>8} {s['avg_grad_sq']:>11.4g} {s['avg_grad_sq_stderr']:>9.2g} "
                  f"{s['min_grad_sq']:>11.4g} {s['min_grad_sq_stderr']:>9.2g} {s['f_final']:>9.4g}")
    K = max(Ks)
    g0 = float(np.mean([res.grad_sq[0].mean() for res in results[K].values()]))
    target = args.target_frac * g0
    hits = {r: block_updates_to_target(res.grad_sq, target) for r, res in results[K].items()}
    report["target"] = {"frac": args.target_frac, "grad_sq": target, "K": K,
                        "rules": {r: {"mean_block_updates": float(h.mean()), "censored": int((h > K).sum())}
                                  for r, h in hits.items()}}
    print(f"\nblock updates until ‖∇f‖² ≤ {args.target_frac:g}·‖∇f(θ_0)‖² (mean over seeds; K+1 if never):")
    base = hits.get("lisa")
    for r, h in hits.items():
        ratio = f"  lisa/{r} = {base.mean() / h.mean():.2f}" if base is not None and h.mean() > 0 else ""
        print(f"{r:>8}: {h.mean():8.1f}  (never reached in {int((h > K).sum())}/{h.size} seeds){ratio}")
        if base is not None and h.mean() > 0:
            report["target"]["rules"][r]["lisa_over_rule"] = float(base.mean() / h.mean())
    if len(Ks) >= 2:
        report["rate"] = {}
        print("\nslope of (1/K)Σ‖∇f(θ_k)‖² vs K (α = α₀/√K), 95% bootstrap interval over seeds; theory: ≤ -0.5")
        for r in rules:
            fits = {}
            for name, get in (("avg", lambda x: x.avg_grad_sq()), ("min", lambda x: x.min_grad_sq())):
                fits[name] = rate_fit(Ks, [get(results[K][r]) for K in Ks])
            report["rate"][r] = {name: fit.__dict__ for name, fit in fits.items()}
            a = fits["avg"]
            print(f"{r:>8}: slope {a.slope:+.3f} [{a.lo:+.3f}, {a.hi:+.3f}]  C (max y·√K) {a.C_half:.4g}  "
                  f"{'≤ -1/2 within CI' if a.covered else 'NOT ≤ -1/2'};  min-slope {fits['min'].slope:+.3f}")
    if args.out is not None:
        tmp = args.out / ".summary.json.tmp"  # written whole, then renamed: never a half-written summary
        tmp.write_text(json.dumps(report, indent=2, default=_json_default))
        os.replace(tmp, args.out / "summary.json")
        if not args.no_plots:
            _plots(args.out, results, report)
        print(f"wrote {args.out / 'summary.json'}")
    return 0


def _run_parallel(problem: Problem, runs: list[tuple[int, str]], seeds: int, config: Callable[[int], SimConfig],
                  seed: int, jobs: int, bar: Any) -> dict[tuple[int, str], SimResult]:
    """Every (K, rule) run of ``runs`` in a pool of ``jobs`` processes, longest first; the same results as
    running them one after the other (each run depends only on its own arguments, never on the others)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from .simulate import simulate

    # spawn: a fresh interpreter per worker, no forked BLAS thread pools or locks
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(simulate, problem, r, K, seeds, config(K), seed): (K, r)
                   for K, r in sorted(runs, key=lambda kr: -kr[0])}
        done = {}
        for f in as_completed(futures):
            done[futures[f]] = f.result()
            bar.update(futures[f][0])
    return done


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


def _plots(out: Path, results: dict, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = max(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r, res in results[K].items():
        ax.semilogy(res.grad_sq.mean(axis=1), label=r)
    ax.set_xlabel("block update k")
    ax.set_ylabel("‖∇f(θ_k)‖² (mean over seeds)")
    ax.set_title(f"{report['problem']}, K={K}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "grad_sq.png", dpi=100)
    plt.close(fig)
    if "rate" in report:
        Ks = np.array(sorted(results), dtype=float)
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, fits in report["rate"].items():
            y = np.array(fits["avg"]["y"])
            ax.loglog(Ks, y, "o-", label=f"{r} (slope {fits['avg']['slope']:+.2f})")
        ref = np.array(report["rate"][next(iter(report["rate"]))]["avg"]["y"])[0] * np.sqrt(Ks[0] / Ks)
        ax.loglog(Ks, ref, "k--", label="∝ 1/√K")
        ax.set_xlabel("K (block updates), α = α₀/√K")
        ax.set_ylabel("(1/K) Σ ‖∇f(θ_k)‖²")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rate.png", dpi=100)
        plt.close(fig)


def load_norms(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read (sizes, layer ids, squared norms, names) from JSON.

    Accepted shapes: ``{"modules": [{"name", "size", "layer", "sq_norm" | "score"}, ...]}``, or parallel lists
    ``{"sizes", "layers" | "groups", "sq_norms" | "scores", optional "names" | "modules"}`` (the latter is
    what the trainer's ``importance.json`` holds).  Raises ValueError on anything else.
    """
    data = json.loads(Path(path).read_text())
    per_module = isinstance(data, dict) and isinstance(data.get("modules"), list) and all(
        isinstance(m, dict) for m in data["modules"])
    if per_module:
        mods = data["modules"]
        try:
            sizes = [m["size"] for m in mods]
            layers = [m.get("layer", i) for i, m in enumerate(mods)]
            norms = [m["sq_norm"] if "sq_norm" in m else m["score"] for m in mods]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: every module needs 'size' and 'sq_norm' (or 'score'): missing {e}") from None
        names = [str(m.get("name", i)) for i, m in enumerate(mods)]
    elif isinstance(data, dict) and "sizes" in data:
        sizes = data["sizes"]
        layers = data.get("layers", data.get("groups", list(range(len(sizes)))))
        norms = data.get("sq_norms", data.get("scores"))
        if norms is None:
            raise ValueError(f"{path}: needs 'sq_norms' (or 'scores') next to 'sizes'")
        # the trainer's importance.json: parallel lists, with the module names under "modules"
        names = [str(x) for x in data.get("names", data.get("modules", range(len(sizes))))]
    else:
        raise ValueError(f"{path}: expected a 'modules' list or 'sizes'/'sq_norms' lists")
    sizes_a, layers_a, norms_a = (np.asarray(x) for x in (sizes, layers, norms))
    if not (sizes_a.shape == layers_a.shape == norms_a.shape) or sizes_a.ndim != 1:
        raise ValueError(f"{path}: sizes, layers and norms must be equally long lists")
    return sizes_a.astype(np.int64), layers_a.astype(np.int64), norms_a.astype(float), names


def variance_table(sq_norms: np.ndarray, sizes: np.ndarray, layers: np.ndarray, delta: float,
                   etas: list[float]) -> dict[str, float]:
    """Σ_b a_b(1/π_b − 1) for the five designs at budget ⌊δ·Σn_b⌋ (inf where a module with a_b>0 has π=0).

    Designs: uniform / optimal layer-wise, uniform / optimal module-wise, and the paper's softmax
    π ∝ softmax(η·a/mean a) capped at 1 (one entry per η).  Values are in units of a (squared norm).
    """
    from .optimal import kl_softmax, optimal_inclusion, proportional_inclusion

    budget = float(np.floor(delta * sizes.sum()))
    gid = np.unique(layers, return_inverse=True)[1]
    layer_sizes = np.bincount(gid, sizes).astype(float)
    n = sizes.astype(float)

    def var(pi: np.ndarray) -> float:
        live = sq_norms > 0
        if np.any(pi[live] <= 0):
            return float("inf")
        return float(np.sum(sq_norms[live] * (1.0 / pi[live] - 1.0)))

    out = {
        "uniform layer-wise": var(proportional_inclusion(np.ones(layer_sizes.size), layer_sizes, budget)[gid]),
        "optimal layer-wise": var(optimal_inclusion(sq_norms, n, budget, groups=gid)),
        "uniform module-wise": var(proportional_inclusion(np.ones(n.size), n, budget)),
        "optimal module-wise": var(optimal_inclusion(sq_norms, n, budget)),
    }
    mean = sq_norms.mean() if sq_norms.mean() > 0 else 1.0
    for eta in etas:
        out[f"paper softmax η={eta:g}"] = var(proportional_inclusion(kl_softmax(sq_norms / mean, eta), n, budget))
    return out


def cmd_variance(args: argparse.Namespace) -> int:
    """Run the ``variance`` command; returns the exit code."""
    try:
        etas = [float(x) for x in args.eta.split(",") if x.strip()]
    except ValueError:
        fail(f"--eta must be a comma list of numbers ≥ 0, got {args.eta!r}")
    if not etas or any(not (e >= 0 and np.isfinite(e)) for e in etas):
        fail(f"--eta must be a comma list of numbers ≥ 0, got {args.eta!r}")
    _check_common(args.delta)
    if args.norms is not None:
        if not args.norms.is_file():
            fail(f"--norms file not found: {args.norms}")
        try:
            sizes, layers, norms, _ = load_norms(args.norms)
        except (ValueError, json.JSONDecodeError) as e:
            fail(str(e))
        source = str(args.norms)
    else:
        from .problems import llama3_8b_layout, synthetic_sq_norms

        sizes, layers, kinds = llama3_8b_layout()
        norms = synthetic_sq_norms(sizes, layers, kinds, seed=args.seed)
        source = f"toy {args.toy} (synthetic heterogeneous norms, seed {args.seed})"
    if np.any(sizes <= 0) or np.any(norms < 0) or not np.all(np.isfinite(norms)):
        fail("sizes must be > 0 and squared norms finite and ≥ 0")
    budget = int(np.floor(args.delta * sizes.sum()))
    gid = np.unique(layers, return_inverse=True)[1]
    if budget < np.bincount(gid, sizes).max():
        fail(f"--delta={args.delta:g} gives a budget of {budget} parameters, smaller than one layer "
             f"({int(np.bincount(gid, sizes).max())}); layer-wise designs need δ ≥ "
             f"{np.bincount(gid, sizes).max() / sizes.sum():.3g}")
    table = variance_table(norms, sizes, layers, args.delta, etas)
    total = float(norms.sum())
    if args.json:
        print(json.dumps({"source": source, "delta": args.delta, "budget": budget, "sum_sq_norms": total,
                          "variance": table}, indent=2))
        return 0
    print(f"{source}: {sizes.size} modules, {gid.max() + 1} layers, {int(sizes.sum()):,} parameters, "
          f"δ={args.delta:g} (budget {budget:,})")
    print(f"{'design':>26} {'E‖ĝ−g‖²':>12} {'/ ‖g‖²':>9}")
    for name, val in table.items():
        print(f"{name:>26} {val:>12.4g} {val / total if total > 0 else float('nan'):>9.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m misa_theory``."""
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return cmd_simulate(args)
    return cmd_variance(args)
