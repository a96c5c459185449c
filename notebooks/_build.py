"""Generate notebooks/01_variance.ipynb, 02_convergence.ipynb, 03_sampling.ipynb from the cells below.

Run ``python notebooks/_build.py`` after editing; the .ipynb files are outputs of this script (kept unexecuted).
Every notebook reads MISA_NB_SMALL=1 (tiny sizes, for the test suite) and MISA_NB_FIGDIR (figure folder).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''import os, sys, json
from pathlib import Path
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(ROOT))
SMALL = os.environ.get("MISA_NB_SMALL", "0") == "1"   # tiny sizes for CI
FIGDIR = Path(os.environ.get("MISA_NB_FIGDIR", ROOT / "notebooks" / "figures"))
FIGDIR.mkdir(parents=True, exist_ok=True)
print("small" if SMALL else "full", "run; figures ->", FIGDIR)'''

NB1 = [
    new_markdown_cell("# 01 — What the active set misses: module-wise vs layer-wise\n"
                      "The trainer runs unweighted block-Adam on the masked gradient g_S; Adam divides any constant "
                      "per-block scale back out, so the account that applies is the **deficit** "
                      "D(π) = E‖g − g_S‖² = Σ_b a_b(1 − π_b), the squared gradient the active set leaves "
                      "untouched (proofs/07). Under a parameter budget δ its optimum is greedy by a_b/n_b "
                      "(proofs/08), module-wise never misses more than layer-wise (proofs/10), and the "
                      "KL-regularised optimum is π ∝ exp(η·a_b/n_b) capped at 1 (proofs/09; the paper's softmax "
                      "when sizes are equal). Designs below: Llama-3-8B module sizes (32 layers, d=4096, kv=1024, "
                      "ff=14336) with a synthetic heterogeneous norm profile."),
    new_code_cell(SETUP),
    new_code_cell('''from misa_theory.problems import llama3_8b_layout, synthetic_sq_norms
from misa_theory.optimal import (deficit_optimal_inclusion, kl_deficit_inclusion, kl_softmax, optimal_inclusion,
                                 proportional_inclusion)
sizes, layers, kinds = llama3_8b_layout()
a = synthetic_sq_norms(sizes, layers, kinds, seed=0)
layer_frac = np.bincount(layers, sizes).max() / sizes.sum()
deltas = np.geomspace(max(layer_frac, 0.035), 0.9, 5 if SMALL else 20)
etas = [1, 4] if SMALL else [0.5, 1, 2, 4]

def designs(a, sizes, layers, delta, etas):
    """Inclusion π per module for each design at budget ⌊δ·Σn⌋; η is dimensionless (scores over their mean)."""
    n = sizes.astype(float)
    budget = float(np.floor(delta * n.sum()))
    gid = np.unique(layers, return_inverse=True)[1]
    rho = a / n                                    # squared gradient per parameter
    out = {
        "uniform π = δ (LISA, BAdam on average; uniform module-wise)": proportional_inclusion(np.ones(n.size), n,
                                                                                              budget),
        "optimal layer-wise": deficit_optimal_inclusion(a, n, budget, groups=gid),
        "optimal module-wise": deficit_optimal_inclusion(a, n, budget),
        "HT-variance-optimal module-wise": optimal_inclusion(a, n, budget),
    }
    for eta in etas:
        out[f"paper softmax ∝ exp(η·a/mean a), η={eta:g}"] = proportional_inclusion(
            kl_softmax(a / a.mean(), eta), n, budget)
        out[f"KL-optimal ∝ exp(η·ρ/mean ρ), η={eta:g}"] = kl_deficit_inclusion(a, n, budget, eta / rho.mean())
    return out

def deficit(a, pi):
    return float(np.sum(a * (1 - pi)))

def reweighted_var(a, pi):  # inf when a module with a_b > 0 is never drawn: the estimator does not exist
    live = a > 0
    return float("inf") if np.any(pi[live] <= 0) else float(np.sum(a[live] * (1 / pi[live] - 1)))

table = [designs(a, sizes, layers, d, etas) for d in deltas]
D = {k: np.array([deficit(a, t[k]) for t in table]) / a.sum() for k in table[0]}
for i in range(len(deltas)):   # proofs/10 and the subset argument, on every δ
    assert D["optimal module-wise"][i] <= D["optimal layer-wise"][i] + 1e-12
    assert D["optimal layer-wise"][i] <= D[next(k for k in D if k.startswith("uniform"))][i] + 1e-12
print({k: f"{v[0]:.3g}" for k, v in D.items()})'''),
    new_code_cell('''FIXED = {"optimal module-wise": ("tab:red", "-", 2.6),
         "optimal layer-wise": ("tab:orange", "-", 2.6),
         "HT-variance-optimal module-wise": ("tab:purple", "-", 1.4),
         "HT-variance-optimal layer-wise": ("tab:purple", "-.", 1.4)}

def style(name, k_paper, k_kl):
    if name in FIXED:
        return FIXED[name]
    if name.startswith("uniform"):
        return ("0.5", "-", 1.4)
    if name.startswith("paper"):
        return (plt.cm.Blues(0.45 + 0.55 * k_paper / max(len(etas) - 1, 1)), "--", 1.2)
    return (plt.cm.Greens(0.45 + 0.55 * k_kl / max(len(etas) - 1, 1)), ":", 1.6)

def plot_designs(values, deltas, ylabel, title, path, log_y=False):
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    k_paper = k_kl = 0
    for name, y in values.items():
        ok = np.isfinite(y)
        color, ls, lw = style(name, k_paper, k_kl)
        k_paper += name.startswith("paper")
        k_kl += name.startswith("KL")
        if ok.any():
            (ax.loglog if log_y else ax.semilogx)(deltas[ok], y[ok], ls=ls, color=color, lw=lw, label=name)
    ax.set_xlabel("budget δ (fraction of parameters active)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return fig
plot_designs(D, deltas, "deficit E‖g − g_S‖² / ‖g‖²", "what the active set misses (unweighted update)",
             FIGDIR / "01_deficit_toy.png")
i = len(deltas) // 2
print(f"δ = {deltas[i]:.3f}: deficit / optimal module-wise deficit",
      {k: round(float(v[i] / D["optimal module-wise"][i]), 3) for k, v in D.items()})'''),
    new_markdown_cell("## The reweighted variant (`reweight=True`)\nWith ĝ_b = 1[b∈S]·g_b/π_b (Horvitz–Thompson) "
                      "the estimator is unbiased and E‖ĝ−g‖² = Σ_b a_b(1/π_b − 1) (proofs/01); its optimum is "
                      "π ∝ √(a/n) (proofs/02). This is the account of an update proportional to ĝ, not of the "
                      "default trainer. The greedy designs leave modules at π = 0, where this variance is infinite "
                      "(not drawn)."),
    new_code_cell('''V = {k: np.array([reweighted_var(a, t[k]) for t in table]) / a.sum() for k in table[0]}
V["HT-variance-optimal layer-wise"] = np.array([reweighted_var(a, optimal_inclusion(
    a, sizes, np.floor(d * sizes.sum()), groups=layers)) for d in deltas]) / a.sum()
plot_designs(V, deltas, "E‖ĝ−g‖² / ‖g‖²", "reweighted variant: Horvitz–Thompson variance",
             FIGDIR / "01_variance_toy.png", log_y=True)'''),
    new_markdown_cell("## Measured norms (from the trainer)\nThe trainer writes `importance.json` into its run "
                      "folder. Point `MISA_IMPORTANCE_JSON` at it (or put it at `notebooks/importance.json`); "
                      "this cell is skipped, saying so, when the file is absent."),
    new_code_cell('''# --- MEASURED NORMS: loads the trainer's importance.json if it exists ---
from misa_theory.cli import load_norms
path = Path(os.environ.get("MISA_IMPORTANCE_JSON", ROOT / "notebooks" / "importance.json"))
if path.is_file():
    msizes, mlayers, mnorms, _ = load_norms(path)
    lf = np.bincount(np.unique(mlayers, return_inverse=True)[1], msizes).max() / msizes.sum()
    md = np.geomspace(min(max(lf, 1e-3), 0.9), 0.9, 5 if SMALL else 15)
    mtable = [designs(mnorms, msizes, mlayers, d, etas) for d in md]
    MD = {k: np.array([deficit(mnorms, t[k]) for t in mtable]) / mnorms.sum() for k in mtable[0]}
    plot_designs(MD, md, "deficit E‖g − g_S‖² / ‖g‖²", f"measured norms ({path.name}): deficit",
                 FIGDIR / "01_deficit_measured.png")
    MV = {k: np.array([reweighted_var(mnorms, t[k]) for t in mtable]) / mnorms.sum() for k in mtable[0]}
    plot_designs(MV, md, "E‖ĝ−g‖² / ‖g‖²", f"measured norms ({path.name}): reweighted variant",
                 FIGDIR / "01_variance_measured.png", log_y=True)
else:
    print(f"no measured norms at {path}: skipping this plot (run the trainer, then set MISA_IMPORTANCE_JSON)")'''),
]

NB2 = [
    new_markdown_cell("# 02 — Convergence: ‖∇f‖² vs K with α = α₀/√K\nOne *block update* = one draw + T inner "
                      "Adam steps (misa_theory/simulate.py). The theory (proofs/05_convergence.md) predicts "
                      "(1/K)Σ‖∇f(θ_k)‖² = O(1/√K)."),
    new_code_cell(SETUP),
    new_code_cell('''from misa_theory.problems import make_problem
from misa_theory.convergence import rate_check
from misa_theory.sim_config import SimConfig, alpha_for
from misa_theory.sim_stats import block_updates_to_target, rate_fit
from misa_theory.simulate import simulate
problem = make_problem("robust", heterogeneity=2.0)
Ks = [30, 100, 300] if SMALL else [100, 300, 1000, 3000]  # horizons past the first periods' transient
SEEDS = 3 if SMALL else 10
rules = ["misa", "lisa", "badam", "adam"] if SMALL else ["misa", "optimal", "uniform", "lisa", "badam", "adam"]
T, ALPHA0 = 2, 0.3
res = {r: {K: simulate(problem, r, K, SEEDS, SimConfig(alpha=alpha_for(K, ALPHA0), T=T, sigma=0.05))
           for K in Ks} for r in rules}
fits = {r: rate_fit(Ks, [res[r][K].avg_grad_sq() for K in Ks]) for r in rules}
for r, f in fits.items():
    print(f"{r:>8}: slope {f.slope:+.3f} [{f.lo:+.3f}, {f.hi:+.3f}]  C={f.C_half:.3g}  check {rate_check(f)}")'''),
    new_markdown_cell("Negative controls: the check must fail runs the theorem does not cover: the module with the "
                      "largest gradient never drawn (π = 0, a gradient floor) and a constant step α = α₀ (no 1/√K "
                      "decay). `benchmarks/sim_study.py` adds the proof's constant (docs/simulator.md)."),
    new_code_cell('''worst = int(np.argmax(problem.module_sq_norms(problem.grad(problem.x0(1)))[0]))
controls = {"module at π = 0": lambda K: SimConfig(alpha=alpha_for(K, ALPHA0), T=T, sigma=0.05, excluded=(worst,)),
            "constant α = α₀": lambda K: SimConfig(alpha=ALPHA0, T=T, sigma=0.05)}
for name, cfg in controls.items():
    f = rate_fit(Ks, [simulate(problem, "uniform", K, SEEDS, cfg(K)).avg_grad_sq() for K in Ks])
    print(f"{name:>16}: slope {f.slope:+.3f} [{f.lo:+.3f}, {f.hi:+.3f}]  check {rate_check(f)}")'''),
    new_code_cell('''fig, ax = plt.subplots(figsize=(6.5, 4.5))
for r in rules:
    ax.loglog(Ks, fits[r].y, "o-", label=f"{r} ({fits[r].slope:+.2f})")
ax.loglog(Ks, fits[rules[0]].y[0] * np.sqrt(Ks[0] / np.array(Ks)), "k--", label="∝ 1/√K")
ax.set_xlabel("K (block updates)"); ax.set_ylabel("(1/K) Σ ‖∇f(θ_k)‖²"); ax.legend(fontsize=8)
fig.tight_layout(); fig.savefig(FIGDIR / "02_rate.png", dpi=90)'''),
    new_code_cell('''# MISA vs LISA vs BAdam vs full Adam on the longest horizon
K = Ks[-1]
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for r in rules:
    ax.semilogy(res[r][K].grad_sq.mean(axis=1), label=r)
ax.set_xlabel("block update k"); ax.set_ylabel("‖∇f(θ_k)‖²"); ax.legend(fontsize=8)
fig.tight_layout(); fig.savefig(FIGDIR / "02_trajectories.png", dpi=90)
target = 0.1 * res["lisa"][K].grad_sq[0].mean()
hits = {r: block_updates_to_target(res[r][K].grad_sq, target).mean() for r in rules}
# one α₀ for every rule: a picture, not a comparison (benchmarks/sim_study.py tunes α₀ per rule)
print("block updates to 0.1·‖∇f(θ_0)‖²:", {r: round(float(h), 1) for r, h in hits.items()})'''),
    new_code_cell('''# effect of T (inner steps) and η (softmax temperature) on MISA
K = Ks[-1]
Ts = [1, 2, 4] if SMALL else [1, 2, 5, 10]
etas = [0.0, 1.0, 4.0] if SMALL else [0.0, 0.5, 1.0, 2.0, 4.0]
byT = [simulate(problem, "misa", K, SEEDS, SimConfig(alpha=alpha_for(K, ALPHA0), T=t, sigma=0.05)).avg_grad_sq().mean()
       for t in Ts]
byEta = [simulate(problem, "misa", K, SEEDS, SimConfig(alpha=alpha_for(K, ALPHA0), T=T, sigma=0.05, eta=e))
         .avg_grad_sq().mean() for e in etas]
fig, axs = plt.subplots(1, 2, figsize=(9, 3.5))
axs[0].plot(Ts, byT, "o-"); axs[0].set_xlabel("T"); axs[0].set_ylabel("(1/K) Σ ‖∇f‖²")
axs[1].plot(etas, byEta, "o-"); axs[1].set_xlabel("η")
fig.tight_layout(); fig.savefig(FIGDIR / "02_T_eta.png", dpi=90)'''),
]

NB3 = [
    new_markdown_cell("# 03 — What the sampler draws\nInclusion of each module over time (seed 0), and the "
                      "empirical marginals against the target π the sampler reports."),
    new_code_cell(SETUP),
    new_code_cell('''from misa_theory.problems import make_problem
from misa_theory.sim_config import SimConfig
from misa_theory.simulate import simulate
problem = make_problem("robust", heterogeneity=2.0)
K = 60 if SMALL else 600
out = {r: simulate(problem, r, K, 1, SimConfig(alpha=0.3 / np.sqrt(K), T=2, sigma=0.05), record_draws=True)
       for r in ["misa", "misa_norm", "optimal", "lisa", "badam"]}
order = np.lexsort((np.arange(problem.n_modules), problem.groups))  # layer-major for display'''),
    new_code_cell('''fig, axs = plt.subplots(len(out), 1, figsize=(8, 2.2 * len(out)), sharex=True)
for ax, (r, res) in zip(axs, out.items()):
    incl = np.zeros((problem.n_modules, K))
    for k, d in enumerate(res.draws):
        incl[d, k] = 1
    ax.imshow(incl[order], aspect="auto", interpolation="nearest", cmap="Greys")
    ax.set_ylabel(f"{r}\\nmodule (layer-major)", fontsize=8)
axs[-1].set_xlabel("block update k")
fig.tight_layout(); fig.savefig(FIGDIR / "03_heatmap.png", dpi=90)'''),
    new_code_cell('''fig, axs = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, r in zip(axs, ["misa_norm", "optimal"]):  # misa's sequential draw has no closed-form π
    res = out[r]
    burn = K // 3   # after exploration, when π is score-driven
    emp = np.zeros(problem.n_modules)
    for d in res.draws[burn:]:
        emp[d] += 1
    emp /= (K - burn)
    target = res.target_pi[burn:].mean(axis=0)
    ax.scatter(target, emp, s=12)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("mean target π_b"); ax.set_ylabel("empirical inclusion"); ax.set_title(r)
    print(r, "max |emp - π| =", round(float(np.abs(emp - target).max()), 3))
fig.tight_layout(); fig.savefig(FIGDIR / "03_marginals.png", dpi=90)'''),
]


def build() -> None:
    """Write the three notebooks next to this file."""
    for name, cells in (("01_variance", NB1), ("02_convergence", NB2), ("03_sampling", NB3)):
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    build()
