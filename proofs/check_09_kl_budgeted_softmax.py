"""Check every algebraic step of proofs/09_kl_budgeted_softmax.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

M = 3


def stationarity_and_cap() -> None:
    """F'' < 0, the interior root, the cap multiplier, and c = δ e^{−ηλ}."""
    a = sp.symbols("a", nonnegative=True)
    w, eta, delta, pi, lam = sp.symbols("w eta delta pi lambda", positive=True)
    mu = sp.symbols("mu", nonnegative=True)
    F = a * pi - w * (pi * sp.log(pi / delta) - pi + delta) / eta
    equal("d2F/dpi2 = -w/(eta pi) (< 0: strictly concave)", sp.diff(F, pi, 2), -w / (eta * pi))
    dF = sp.diff(F, pi)
    equal("dF/dpi = a - (w/eta) log(pi/delta)", dF, a - w * sp.log(pi / delta) / eta)
    holds("dF/dpi -> +oo as pi -> 0+ (lower bound inactive)", sp.limit(dF, pi, 0, "+") == sp.oo)
    stat = dF - lam * w - mu
    root = sp.solve(stat.subs(mu, 0), pi)
    holds("interior: a single root", len(root) == 1)
    equal("interior: pi = delta exp(eta (a/w - lambda))", root[0], delta * sp.exp(eta * (a / w - lam)))
    equal("= c exp(eta a/w) with c = delta exp(-eta lambda)", root[0],
          delta * sp.exp(-eta * lam) * sp.exp(eta * a / w))
    mu_cap = sp.solve(stat.subs(pi, 1), mu)[0]
    equal("cap: mu = a - lambda w + (w/eta) log(delta)", mu_cap, a - lam * w + w * sp.log(delta) / eta)
    # mu ≥ 0 ⟺ log δ + η(a/w − λ) ≥ 0 ⟺ the interior formula is ≥ 1
    equal("cap: eta mu / w = log(delta exp(eta(a/w - lambda)))", sp.expand(eta * mu_cap / w),
          sp.expand(sp.expand_log(sp.log(root[0]), force=True)))


def regulariser_is_budget_times_kl() -> None:
    """On Σ w π = B: Σ w[π log(π/δ) − π + δ] = B·KL(p‖s), p = wπ/B, s = w/W, δ = B/W."""
    w = sp.symbols(f"w0:{M}", positive=True)
    p1, p2 = sp.symbols("pi0 pi1", positive=True)
    B = sp.symbols("B", positive=True)
    W = sum(w)
    delta = B / W
    pi = [p1, p2, (B - w[0] * p1 - w[1] * p2) / w[2]]  # the budget is spent
    R = sum(w[b] * (pi[b] * sp.log(pi[b] / delta) - pi[b] + delta) for b in range(M))
    p = [w[b] * pi[b] / B for b in range(M)]
    s = [w[b] / W for b in range(M)]
    equal("budget shares p sum to 1", sum(p), 1)
    kl = sum(p[b] * sp.log(p[b] / s[b]) for b in range(M))
    equal("R = B KL(p || s)", sp.expand(sp.expand_log(R - B * kl, force=True)), 0)
    equal("p_b / s_b = pi_b / delta", sp.simplify(p[0] / s[0] - pi[0] / delta), 0)


def paper_softmax_and_budget() -> None:
    """w ≡ 1: c e^{η a_b} = cZ softmax(ηa)_b; at λ = 0 every π ≥ δ, so the budget binds."""
    eta, c = sp.symbols("eta c", positive=True)
    a = sp.symbols(f"a0:{M}", nonnegative=True)
    Z = sum(sp.exp(eta * x) for x in a)
    for b in range(M):
        equal(f"c exp(eta a_{b}) = (c Z) softmax(eta a)_{b}", c * sp.exp(eta * a[b]), c * Z * (sp.exp(eta * a[b]) / Z))
    delta, y = sp.symbols("delta y", nonnegative=True)  # y = η ρ_b ≥ 0
    equal("lambda = 0: delta e^{eta rho} - delta = delta (e^{eta rho} - 1)", delta * sp.exp(y) - delta,
          delta * (sp.exp(y) - 1))
    holds("e^y is increasing with e^0 = 1, so e^{eta rho} >= 1: every pi >= min(1, delta), the budget binds",
          bool(sp.diff(sp.exp(y), y).is_positive) and sp.exp(y).subs(y, 0) == 1)


def prefix_lemma() -> None:
    """c_{j−1}x − 1 and c_j x − 1 have the same numerator when R_j = R_{j−1} − w_{j−1}."""
    Rp, wp, x, S = sp.symbols("R_prev w_prev x S", positive=True)
    cp = Rp / (wp * x + S)
    cj = (Rp - wp) / S
    equal("c_{j-1} x - 1 = (R_{j-1} x - w_{j-1} x - S_j)/(w_{j-1} x + S_j)", cp * x - 1,
          (Rp * x - wp * x - S) / (wp * x + S))
    equal("c_j x - 1 = (R_j x - S_j)/S_j", cj * x - 1, ((Rp - wp) * x - S) / S)
    equal("numerators agree", sp.expand(Rp * x - wp * x - S), sp.expand((Rp - wp) * x - S))


def limits() -> None:
    """η → 0: π → δ; η → ∞ on ρ0 > ρ1 > ρ2, w0 < B < w0 + w1: greedy (1, (B − w0)/w1, 0)."""
    eta = sp.symbols("eta", positive=True)
    w = sp.symbols(f"w0:{M}", positive=True)
    r2, d1, d0 = sp.symbols("rho2 d1 d0", positive=True)
    rho = [r2 + d1 + d0, r2 + d1, r2]
    B = sp.symbols("B", positive=True)
    den = sum(w[b] * sp.exp(eta * rho[b]) for b in range(M))
    for b in range(M):
        equal(f"eta -> 0: uncapped pi_{b} -> delta", sp.limit(B * sp.exp(eta * rho[b]) / den, eta, 0), B / sum(w))
    t = sp.symbols("t", positive=True)  # B = w0 + t w1 with 0 < t < 1
    rest = t * w[1]
    den12 = w[1] * sp.exp(eta * rho[1]) + w[2] * sp.exp(eta * rho[2])
    pi1 = sp.simplify(rest * sp.exp(eta * rho[1]) / den12)
    pi2 = sp.simplify(rest * sp.exp(eta * rho[2]) / den12)
    c0 = sp.simplify(rest * sp.exp(eta * rho[0]) / den12)  # module 0's value under the same c
    equal("budget: w0 + w1 pi1 + w2 pi2 = B", w[0] + w[1] * pi1 + w[2] * pi2, w[0] + t * w[1])
    holds("eta -> oo: module 0's c e^{eta rho0} -> oo (capped)", sp.limit(c0, eta, sp.oo) == sp.oo)
    equal("eta -> oo: pi1 -> (B - w0)/w1 = t", sp.limit(pi1, eta, sp.oo), t)
    equal("eta -> oo: pi2 -> 0", sp.limit(pi2, eta, sp.oo), 0)


def rate_and_monotonicity() -> None:
    """φ(x) = x log(x/δ) − x + δ ≥ 0; the rate chain; the η-monotonicity algebra."""
    x, delta = sp.symbols("x delta", positive=True)
    phi = x * sp.log(x / delta) - x + delta
    equal("phi(delta) = 0", phi.subs(x, delta), 0)
    equal("phi'(delta) = 0", sp.diff(phi, x).subs(x, delta), 0)
    equal("phi'' = 1/x > 0", sp.diff(phi, x, 2), 1 / x)
    # R(π*) with π* ∈ {0, 1} except one fractional: each term w π log(π/δ) ≤ w π log(1/δ) for π ≤ 1.
    p = sp.symbols("p", positive=True)
    equal("pi log(pi/delta) - pi log(1/delta) = pi log(pi)",
          sp.expand_log(p * sp.log(p / delta) - p * sp.log(1 / delta), force=True), p * sp.log(p))
    q = sp.symbols("q", nonnegative=True)  # π = 1/(1 + q) covers (0, 1]
    holds("pi log(pi) = -log(1+q)/(1+q) <= 0 on (0, 1]",
          sp.simplify((p * sp.log(p)).subs(p, 1 / (1 + q)) + sp.log(1 + q) / (1 + q)) == 0
          and sp.ask(sp.Q.nonpositive(-sp.log(1 + q) / (1 + q))))
    C1, C2, R1, R2, e1, e2 = sp.symbols("C1 C2 R1 R2 eta1 eta2", positive=True)
    # optimality at η1 against π2, and at η2 against π1, added:
    s = (C1 - R1 / e1 - (C2 - R2 / e1)) + (C2 - R2 / e2 - (C1 - R1 / e2))
    equal("sum of the two optimality gaps = (R2 - R1)(1/eta1 - 1/eta2)", s, (R2 - R1) * (1 / e1 - 1 / e2))


if __name__ == "__main__":
    stationarity_and_cap()
    regulariser_is_budget_times_kl()
    paper_softmax_and_budget()
    prefix_lemma()
    limits()
    rate_and_monotonicity()
    finish()
