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
    from .sim_config import SimConfig
    from .simulate import SimResult

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
    from .sim_config import ALL_RULES

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
    s.add_argument("--retain-state", action="store_true",
                   help="park the Adam moments of modules that leave and restore them when drawn again "
                        "(the trainer's --retain-state); default: a module that leaves loses them")
    s.add_argument("--momentum-flush", action="store_true", help="flush momentum at the end of each period")
    s.add_argument("--target-frac", type=float, default=0.1,
                   help="report block updates until ‖∇f(θ_k)‖² ≤ frac·‖∇f(θ_0)‖² (first hit, mean over seeds)")
    s.add_argument("--out", type=Path, default=None, help="folder for summary.json and PNG plots")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--jobs", type=int, default=1,
                   help="size of the process pool the (horizon, rule) runs are spread over; results do not "
                        "depend on it")

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
    from .sim_config import ALL_RULES

    if text == "all":
        return list(ALL_RULES)
    rules = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rules if r not in ALL_RULES]
    if bad or not rules:
        fail(f"unknown rule {', '.join(bad) or repr(text)}; choose 'all' or from: {', '.join(ALL_RULES)}")
    return rules


def _check_delta_eta(delta: float, eta: float | None = None) -> None:
    """The variance command's checks (the simulate command's are SimConfig.validate)."""
    if not (0.0 < delta <= 1.0):
        fail(f"--delta must lie in (0, 1], got {delta}")
    if eta is not None and not (eta >= 0 and np.isfinite(eta)):
        fail(f"--eta must be ≥ 0, got {eta}")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # only worth a bar when a run takes seconds; disable=None also hides it when stderr is not a terminal
    return tqdm(total=total, desc=desc, disable=None if total >= 2000 else True, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _sim_config(args: argparse.Namespace, K: int) -> SimConfig:
    from .sim_config import SimConfig, alpha_for

    sgd0 = args.sgd_alpha0 if args.sgd_alpha0 is not None else args.alpha0
    return SimConfig(alpha=alpha_for(K, args.alpha0), T=args.T, delta=args.delta, sigma=args.sigma, eta=args.eta,
                     retain_state=args.retain_state, momentum_flush=args.momentum_flush, sgd_alpha=alpha_for(K, sgd0))


def _check_simulate_args(args: argparse.Namespace, rules: list[str], Ks: list[int]) -> None:
    """Every input error of ``simulate`` before any work: one line naming the option, exit 2."""
    from .sim_config import check_run

    checks = [("--alpha0", args.alpha0), ("--target-frac", args.target_frac)]
    if args.sgd_alpha0 is not None:
        checks.append(("--sgd-alpha0", args.sgd_alpha0))
    for name, value in checks:
        if not (np.isfinite(value) and value > 0):
            fail(f"{name} must be a finite number > 0, got {value}")
    for name, value in (("--seeds", args.seeds), ("--jobs", args.jobs)):
        if value < 1:
            fail(f"{name} must be ≥ 1, got {value}")
    try:
        for K in Ks:
            for rule in rules:
                check_run(rule, K, args.seeds)
            _sim_config(args, K).validate()
    except ValueError as e:
        fail(f"--{e}")
    if args.out is not None:  # a folder that cannot be made is an input error, not lost work
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--out: cannot create {args.out}: {e.strerror or e}")


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the ``simulate`` command: compute, print the table, write summary.json (and plots); exit code."""
    from .problems import make_problem

    rules = _rules(args.rule)
    Ks = args.K_sweep if args.K_sweep is not None else [args.K]
    _check_simulate_args(args, rules, Ks)
    problem = make_problem(args.problem, heterogeneity=args.heterogeneity)
    try:  # e.g. a budget smaller than one layer for lisa/badam
        results = _simulate_all(args, problem, rules, Ks)
    except ValueError as e:
        fail(str(e))
    report = _report(args, problem, results)
    _print_table(args, problem, results, report)
    if args.out is not None:
        _write_summary(args.out, results, report, plots=not args.no_plots)
    return 0


def _simulate_all(args: argparse.Namespace, problem: Problem, rules: list[str],
                  Ks: list[int]) -> dict[int, dict[str, SimResult]]:
    """Every (K, rule) run, one after the other or in a pool of ``--jobs`` processes: {K: {rule: result}}."""
    from .simulate import simulate

    runs = [(K, r) for K in Ks for r in rules]
    bar = _progress(sum(Ks) * len(rules), f"{args.problem}")
    try:
        if args.jobs == 1 or len(runs) == 1:
            done = {(K, r): simulate(problem, r, K, args.seeds, _sim_config(args, K), seed=args.seed,
                                     progress=bar.update) for K, r in runs}
        else:
            done = _run_parallel(problem, runs, args.seeds, lambda K: _sim_config(args, K), args.seed, args.jobs,
                                 bar)
    finally:
        bar.close()
    return {K: {r: done[K, r] for r in rules} for K in Ks}


def _report(args: argparse.Namespace, problem: Problem, results: dict[int, dict[str, SimResult]]) -> dict:
    """summary.json's content: the settings, per-run statistics, updates to the target, and rate fits."""
    from .convergence import rate_check
    from .sim_config import alpha_for
    from .sim_stats import RateFit, block_updates_to_target, rate_fit
    from .simulate import summarize

    report: dict = {"problem": args.problem, "n_params": problem.n_params, "n_modules": problem.n_modules,
                    "seeds": args.seeds, "seed": args.seed, "T": args.T, "alpha0": args.alpha0, "delta": args.delta,
                    "eta": args.eta, "sigma": args.sigma, "heterogeneity": args.heterogeneity,
                    "retain_state": args.retain_state, "momentum_flush": args.momentum_flush,
                    "block_update": "one draw followed by T inner Adam steps; K counts block updates",
                    "runs": {str(K): {"alpha": alpha_for(K, args.alpha0),
                                      "rules": {r: summarize(res) for r, res in per.items()}}
                             for K, per in results.items()}}
    K = max(results)
    g0 = float(np.mean([res.grad_sq[0].mean() for res in results[K].values()]))
    target = args.target_frac * g0
    hits = {r: block_updates_to_target(res.grad_sq, target) for r, res in results[K].items()}
    report["target"] = {"frac": args.target_frac, "grad_sq": target, "K": K,
                        "rules": {r: {"mean_block_updates": float(h.mean()), "censored": int((h > K).sum()),
                                      "seeds": h.size} for r, h in hits.items()}}
    base = hits.get("lisa")
    for r, h in hits.items():
        if base is not None and h.mean() > 0:
            report["target"]["rules"][r]["lisa_over_rule"] = float(base.mean() / h.mean())
    if len(results) >= 2:
        Ks = sorted(results)
        report["rate"] = {r: {name: rate_fit(Ks, [get(results[k][r]) for k in Ks]).__dict__
                              for name, get in (("avg", lambda x: x.avg_grad_sq()), ("min", lambda x: x.min_grad_sq()))}
                          for r in results[K]}
        for fits in report["rate"].values():  # without a bound: the slope part of the check
            fits["avg"]["check"] = rate_check(RateFit(**fits["avg"]))
    return report


def _print_table(args: argparse.Namespace, problem: Problem, results: dict[int, dict[str, SimResult]],
                 report: dict) -> None:
    """The per-run table, block updates to the target, and the rate fits, on stdout."""
    print(f"{args.problem}: n={problem.n_params}, M={problem.n_modules}, δ={args.delta}, T={args.T}, "
          f"σ={args.sigma}, α₀={args.alpha0}, seeds={args.seeds}")
    print(f"{'K':>7} {'rule':>9} {'avg ‖∇f‖²':>11} {'± stderr':>9} {'min ‖∇f‖²':>11} {'± stderr':>9} {'f(θ_K)':>9}")
    for K, per in results.items():
        for r in per:
            s = report["runs"][str(K)]["rules"][r]
            print(f"{K:>7} {r:>9} {s['avg_grad_sq']:>11.4g} {s['avg_grad_sq_stderr']:>9.2g} "
                  f"{s['min_grad_sq']:>11.4g} {s['min_grad_sq_stderr']:>9.2g} {s['f_final']:>9.4g}")
    t = report["target"]
    print(f"\nblock updates until ‖∇f‖² ≤ {t['frac']:g}·‖∇f(θ_0)‖² (mean over seeds; K+1 if never):")
    for r, h in t["rules"].items():
        ratio = f"  lisa/{r} = {h['lisa_over_rule']:.2f}" if "lisa_over_rule" in h else ""
        print(f"{r:>9}: {h['mean_block_updates']:8.1f}  (never reached in {h['censored']}/{h['seeds']} seeds){ratio}")
    if "rate" in report:
        print("\nslope of (1/K)Σ‖∇f(θ_k)‖² vs K (α = α₀/√K), 95% bootstrap interval over seeds; theory: ≤ -0.5 "
              "(pass = the interval reaches -1/2; the proof's constant: benchmarks/sim_study.py)")
        for r, fits in report["rate"].items():
            a = fits["avg"]
            print(f"{r:>9}: slope {a['slope']:+.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}]  C (max y·√K) "
                  f"{a['C_half']:.4g}  check (slope) {a['check']};  "
                  f"min-slope {fits['min']['slope']:+.3f}")


def _write_summary(out: Path, results: dict[int, dict[str, SimResult]], report: dict, plots: bool) -> None:
    """summary.json (written whole, then renamed: never half-written) and, unless ``plots`` is False, the PNGs."""
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    os.replace(tmp, out / "summary.json")
    if plots:
        _plots(out, results, report)
    print(f"wrote {out / 'summary.json'}")


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


def design_inclusions(sq_norms: np.ndarray, sizes: np.ndarray, layers: np.ndarray, delta: float,
                      etas: list[float]) -> dict[str, np.ndarray | None]:
    """π (B,) of each design at budget ⌊δ·Σn_b⌋; None for layer-wise designs when no whole layer fits.

    Designs: uniform / deficit-optimal (greedy by a/n) / HT-variance-optimal (water-filling), each layer-wise
    and module-wise, and the paper's softmax π ∝ softmax(η·a/mean a) capped at 1 (one entry per η).
    """
    from .optimal import deficit_optimal_inclusion, kl_softmax, optimal_inclusion, proportional_inclusion

    budget = float(np.floor(delta * sizes.sum()))
    gid = np.unique(layers, return_inverse=True)[1]
    layer_sizes = np.bincount(gid, sizes).astype(float)
    n = sizes.astype(float)
    fit = budget >= layer_sizes.max()
    out: dict[str, np.ndarray | None] = {
        "uniform layer-wise": proportional_inclusion(np.ones(layer_sizes.size), layer_sizes, budget)[gid]
        if fit else None,
        "deficit-optimal layer-wise": deficit_optimal_inclusion(sq_norms, n, budget, groups=gid) if fit else None,
        "optimal layer-wise": optimal_inclusion(sq_norms, n, budget, groups=gid) if fit else None,
        "uniform module-wise": proportional_inclusion(np.ones(n.size), n, budget),
        "deficit-optimal module-wise": deficit_optimal_inclusion(sq_norms, n, budget),
        "optimal module-wise": optimal_inclusion(sq_norms, n, budget),
    }
    mean = sq_norms.mean() if sq_norms.mean() > 0 else 1.0
    for eta in etas:
        out[f"paper softmax η={eta:g}"] = proportional_inclusion(kl_softmax(sq_norms / mean, eta), n, budget)
    return out


def variance_table(sq_norms: np.ndarray, sizes: np.ndarray, layers: np.ndarray, delta: float,
                   etas: list[float]) -> dict[str, dict[str, float] | None]:
    """Per design of :func:`design_inclusions`: the deficit D = Σ_b a_b(1 − π_b) the trainer's unweighted
    update leaves behind, and the HT variance Σ_b a_b(1/π_b − 1) of the reweighted variant (inf where a
    module with a_b > 0 has π = 0); in units of a (squared norm); None where the design is unavailable."""
    live = sq_norms > 0

    def variance(pi: np.ndarray) -> float:
        if np.any(pi[live] <= 0):
            return float("inf")
        return float(np.sum(sq_norms[live] * (1.0 / pi[live] - 1.0)))

    return {name: None if pi is None else {"deficit": float(np.sum(sq_norms * (1.0 - pi))), "variance": variance(pi)}
            for name, pi in design_inclusions(sq_norms, sizes, layers, delta, etas).items()}


def cmd_variance(args: argparse.Namespace) -> int:
    """Run the ``variance`` command; returns the exit code."""
    try:
        etas = [float(x) for x in args.eta.split(",") if x.strip()]
    except ValueError:
        fail(f"--eta must be a comma list of numbers ≥ 0, got {args.eta!r}")
    if not etas or any(not (e >= 0 and np.isfinite(e)) for e in etas):
        fail(f"--eta must be a comma list of numbers ≥ 0, got {args.eta!r}")
    _check_delta_eta(args.delta)
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
    if budget < sizes.max():
        fail(f"--delta={args.delta:g} gives a budget of {budget} parameters, smaller than the largest module "
             f"({int(sizes.max())}); use δ ≥ {sizes.max() / sizes.sum():.3g}")
    table = variance_table(norms, sizes, layers, args.delta, etas)
    total = float(norms.sum())
    if args.json:
        pick = {key: {k: None if v is None else v[key] for k, v in table.items()} for key in ("deficit", "variance")}
        print(json.dumps({"source": source, "delta": args.delta, "budget": budget, "sum_sq_norms": total, **pick},
                         indent=2))
        return 0
    print(f"{source}: {sizes.size} modules, {gid.max() + 1} layers, {int(sizes.sum()):,} parameters, "
          f"δ={args.delta:g} (budget {budget:,})")
    print(f"{'design':>28} {'deficit D/‖g‖²':>15} {'HT variance (reweighted)/‖g‖²':>30}")
    scale = total if total > 0 else float("nan")
    for name, val in table.items():
        if val is None:
            print(f"{name:>28} {'n/a':>15} {'n/a':>30}  (no whole layer fits the budget)")
        else:
            print(f"{name:>28} {val['deficit'] / scale:>15.3f} {val['variance'] / scale:>30.4g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m misa_theory``."""
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return cmd_simulate(args)
    return cmd_variance(args)
