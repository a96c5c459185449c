"""The markdown tables and the two figures of benchmarks/sim_study.py, from its report dictionary."""

from __future__ import annotations

from pathlib import Path


def _ci(v: dict) -> str:
    return f"{v['mean']:.3g} [{v['lo']:.3g}, {v['hi']:.3g}]"


def _alpha(row: dict) -> str:
    grid = [float(g) for g in row["grid"]]
    edge = " (grid edge)" if row["alpha0"] in (min(grid), max(grid)) else ""
    return f"{row['alpha0']:g}{edge}"


def _target(row: dict) -> str:
    t = row["to_target"]
    med = "—" if t["median"] is None else f"{t['median']:.0f}"
    return f"{med} ({t['reached']}/{t['seeds']})"


def _overlaps_best(rows: list[dict], key: str) -> set[str]:
    """Rules whose 95% interval of ``key`` overlaps the interval of the rule with the smallest mean."""
    ok = [r for r in rows if "n/a" not in r and r["delta"] is not None]
    best = min(ok, key=lambda r: r[key]["mean"])
    return {r["rule"] for r in ok if r[key]["lo"] <= best[key]["hi"]}


def summary_table(report: dict) -> list[str]:
    """f(θ_K) (mean over seeds) of every rule in every (h, δ) cell; bold = lowest among the sampled rules."""
    s = report["settings"]
    cols = [(h, d) for h in s["heterogeneity"] for d in s["delta"]]
    rules = list(dict.fromkeys(r["rule"] for r in report["rows"]))
    value = {(r["rule"], r["heterogeneity"], r["delta"]): r for r in report["rows"]}
    lines = ["\n**f(θ_K) at the tuned α₀**, mean over seeds (bold: lowest sampled rule of the column; "
             "intervals in the tables below)\n",
             "| rule | " + " | ".join(f"h={h:g}, δ={d:g}" for h, d in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    best = {c: min((r["f_final"]["mean"] for r in report["rows"] if (r["heterogeneity"], r["delta"]) == c
                    and "n/a" not in r), default=None) for c in cols}
    for rule in rules:
        cells = []
        for h, d in cols:
            r = value.get((rule, h, d)) or value.get((rule, h, None))
            if r is None or "n/a" in r:
                cells.append("n/a")
                continue
            v = r["f_final"]["mean"]
            cells.append(f"**{v:.3g}**" if v == best[h, d] and r["delta"] is not None else f"{v:.3g}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return lines


def main_tables(report: dict) -> list[str]:
    """One table per heterogeneity: every δ and rule, tuned α₀, the three quantities, updates to target."""
    s = report["settings"]
    lines = []
    for h in s["heterogeneity"]:
        lines += [f"\n**heterogeneity h = {h:g}** (target ‖∇f‖² ≤ {s['target_frac']:g}·‖∇f(θ₀)‖²; "
                  "★ = 95% interval of f(θ_K) overlaps that of the sampled rule with the lowest mean at that δ; the "
                  "baselines adam and sgd update every module and ignore δ)\n",
                  "| δ | rule | α₀ | f(θ_K) [95% CI] | min_k ‖∇f‖² [95% CI] | (1/K)Σ‖∇f‖² [95% CI] | "
                  "updates to target: median (reached) |", "|---|---|---|---|---|---|---|"]
        base = [r for r in report["rows"] if r["heterogeneity"] == h and r["delta"] is None]
        for d in s["delta"]:
            here = [r for r in report["rows"] if r["heterogeneity"] == h and r["delta"] == d] + base
            star = _overlaps_best(here, "f_final")
            for r in here:
                dd = "any" if r["delta"] is None else f"{d:g}"
                if "n/a" in r:
                    lines.append(f"| {dd} | {r['rule']} | n/a | {r['n/a']} | | | |")
                    continue
                mark = " ★" if r["rule"] in star else ""
                lines.append(f"| {dd} | {r['rule']}{mark} | {_alpha(r)} | {_ci(r['f_final'])} | "
                             f"{_ci(r['min_grad_sq'])} | {_ci(r['avg_grad_sq'])} | {_target(r)} |")
    return lines


def rate_table(report: dict) -> list[str]:
    """The K-sweep verdicts, with the proof's bound where it is computable."""
    rate = report["rate"]
    Ks = rate["Ks"]
    lines = [f"\n**Rate check** (h = {rate['heterogeneity']:g}, δ = {rate['delta']:g}; K ∈ {Ks}; slope of "
             "(1/K)Σ‖∇f‖² vs K with a 95% bootstrap interval; pass = interval reaches −1/2 and, where a bound "
             f"is given, the mean ≤ proofs/05's bound at every K; L ≤ {rate['constants']['L']:.3g}, "
             f"sup‖∇f‖ ≤ {rate['constants']['G2']:.3g}, Δ₀ = {rate['constants']['delta0']:.3g})\n",
             "| run | kind | α schedule | α₀ | (1/K)Σ‖∇f‖² at each K | slope [95%] | proof's bound at each K | "
             "check |", "|---|---|---|---|---|---|---|---|"]
    for r in rate["rows"]:
        ys = ", ".join(f"{y:.3g}" for y in r["y"])
        bound = "n/a (Adam: ρ unknown)" if r["bound"] is None else ", ".join(f"{b:.3g}" for b in r["bound"])
        lines.append(f"| {r['name']} | {r['kind']} | {r['schedule']} | {r['alpha0']:g} | {ys} | "
                     f"{r['slope']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}] | {bound} | **{r['verdict']}** |")
    return lines


def markdown(report: dict) -> str:
    """study.md: settings, machine, the main tables and the rate table."""
    s, e, p = report["settings"], report["environment"], report["problem"]
    head = [f"`{report['command']}` — {e['date']}, {e['machine']}, {e['cpus']} CPUs (shared), Python {e['python']}, "
            f"numpy {e['numpy']}, scipy {e['scipy']}; wall time {report['wall_s']:.0f} s.\n",
            f"Problem `robust` ({p['n_layers']} layers, {p['n_params']} parameters, {p['n_modules']} modules); "
            f"K = {s['K']} block updates of T = {s['T']} steps, σ = {s['sigma']:g}, α = α₀/√K; α₀ tuned per cell "
            f"on {s['tune_seeds']} tuning seeds by {s['tune_metric']} over the grid {s['grid']} (Adam-type) / "
            f"{s['sgd_grid']} (sgd); {s['seeds']} evaluation seeds, 95% t-intervals."]
    return "\n".join(head + summary_table(report) + main_tables(report) + rate_table(report)) + "\n"


def figures(report: dict, out: Path) -> None:
    """heterogeneity.png (f(θ_K) and (1/K)Σ‖∇f‖² vs h at the middle δ) and rate.png (the K-sweeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    d = s["delta"][len(s["delta"]) // 2]
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.4))
    rules = dict.fromkeys(r["rule"] for r in report["rows"])
    for rule in rules:
        rows = [r for r in report["rows"] if r["rule"] == rule and r["delta"] in (d, None) and "n/a" not in r]
        hs = [r["heterogeneity"] for r in rows]
        for ax, key in zip(axs, ("f_final", "avg_grad_sq"), strict=True):
            m = [r[key]["mean"] for r in rows]
            err = [[r[key]["mean"] - r[key]["lo"] for r in rows], [r[key]["hi"] - r[key]["mean"] for r in rows]]
            ax.errorbar(hs, m, yerr=err, marker="o", ms=3, capsize=2, label=rule)
    axs[0].set_ylabel("f(θ_K)")
    axs[1].set_ylabel("(1/K) Σ ‖∇f(θ_k)‖²")
    for ax in axs:
        ax.set_xlabel(f"heterogeneity h (δ = {d:g})")
        ax.set_yscale("log")
    axs[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "heterogeneity.png", dpi=80)
    plt.close(fig)
    _rate_figure(report, out, plt)


def _rate_figure(report: dict, out: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in report["rate"]["rows"]:
        style = "--" if r["kind"] == "control" else "-"
        ax.loglog(r["Ks"], r["y"], style, marker="o", ms=3, lw=1, label=f"{r['name']}: {r['verdict']}")
    Ks = report["rate"]["Ks"]
    y0 = max(r["y"][0] for r in report["rate"]["rows"])
    ax.loglog(Ks, [y0 * (Ks[0] / k) ** 0.5 for k in Ks], "k:", lw=1, label="∝ 1/√K")
    ax.set_xlabel("K (block updates)")
    ax.set_ylabel("(1/K) Σ ‖∇f(θ_k)‖²")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / "rate.png", dpi=80)
    plt.close(fig)
