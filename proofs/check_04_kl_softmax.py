"""Check every algebraic step of proofs/04_kl_softmax.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

M = 3


def stationarity() -> None:
    """Derivative of the Lagrangian, its solution, normalisation and KKT for the bound constraints."""
    eta = sp.symbols("eta", positive=True)
    nu = sp.symbols("nu", real=True)
    s = sp.symbols(f"s0:{M}", real=True)
    p = sp.symbols(f"p0:{M}", positive=True)
    F = sum(p[b] * s[b] for b in range(M)) - sum(p[b] * sp.log(M * p[b]) for b in range(M)) / eta
    L = F + nu * (1 - sum(p))
    for b in range(M):
        d = sp.diff(L, p[b])
        equal(f"dL/dp_{b} = s_{b} - (log(M p_{b}) + 1)/eta - nu", d, s[b] - (sp.log(M * p[b]) + 1) / eta - nu)
        root = sp.solve(d, p[b])
        holds(f"p_{b}: a single root", len(root) == 1)
        equal(f"p_{b} = exp(eta s_{b} - 1 - eta nu)/M", root[0], sp.exp(eta * s[b] - 1 - eta * nu) / M)
    # Normalising: sum_b exp(eta s_b - 1 - eta nu)/M = 1 solves for nu.
    Z = sum(sp.exp(eta * s[c]) for c in range(M))
    nu_star = sp.solve(sp.Eq(sum(sp.exp(eta * s[b] - 1 - eta * nu) / M for b in range(M)), 1), nu)
    holds("normalisation: a single real nu", len(nu_star) == 1)
    soft = [sp.exp(eta * s[b]) / Z for b in range(M)]
    for b in range(M):
        equal(f"p_{b} at nu* = softmax(eta s)_{b}", sp.exp(eta * s[b] - 1 - eta * nu_star[0]) / M, soft[b])
    equal("softmax sums to 1", sum(soft), 1)
    holds("softmax entries > 0 (bound multipliers 0)", all(sp.ask(sp.Q.positive(q)) for q in soft))
    # Stationarity holds exactly at the softmax with nu*.
    for b in range(M):
        at_soft = sp.diff(L, p[b]).subs({p[c]: soft[c] for c in range(M)}).subs(nu, nu_star[0])
        equal(f"dL/dp_{b} = 0 at softmax", at_soft, 0)
    # Optimal value is the log-mean-exp.
    Fstar = F.subs({p[c]: soft[c] for c in range(M)})
    log_mean_exp = sp.log(Z / M) / eta
    equal("F(softmax) = (1/eta) log(Z/M)", sp.expand_log(Fstar, force=True), sp.expand_log(log_mean_exp, force=True))


def concavity() -> None:
    """Hessian = -(1/eta) diag(1/p), negative definite."""
    eta = sp.symbols("eta", positive=True)
    s = sp.symbols(f"s0:{M}", real=True)
    p = sp.symbols(f"p0:{M}", positive=True)
    F = sum(p[b] * s[b] for b in range(M)) - sum(p[b] * sp.log(M * p[b]) for b in range(M)) / eta
    H = sp.hessian(F, p)
    equal("Hessian = -(1/eta) diag(1/p_b)", H, -sp.diag(*[1 / (eta * q) for q in p]))
    holds("each diagonal entry < 0 (negative definite)", all(sp.ask(sp.Q.negative(H[b, b])) for b in range(M)))
    # Concavity on the simplex means the unique stationary point dominates: check the value gap
    # F(softmax) - F(p) = KL(p || softmax)/eta >= 0 for any p in the simplex.
    Z = sum(sp.exp(eta * s[c]) for c in range(M))
    q = [sp.exp(eta * s[b]) / Z for b in range(M)]
    Fq = F.subs({p[c]: q[c] for c in range(M)})
    kl = sum(p[b] * sp.log(p[b] / q[b]) for b in range(M)) / eta
    diff = (Fq - F - kl).subs(p[M - 1], 1 - sum(p[: M - 1]))
    equal("F(softmax) - F(p) = KL(p||softmax)/eta on the simplex", sp.expand(sp.expand_log(diff, force=True)), 0)


def limits() -> None:
    """eta -> 0 gives uniform; eta -> infinity gives the argmax."""
    eta = sp.symbols("eta", positive=True)
    s = sp.symbols(f"s0:{M}", real=True)
    Z = sum(sp.exp(eta * s[c]) for c in range(M))
    for b in range(M):
        equal(f"eta->0: p_{b} -> 1/M", sp.limit(sp.exp(eta * s[b]) / Z, eta, 0), sp.Rational(1, M))
    # Unique maximiser s0 = s2 + d1 + d2 > s1 = s2 + d2 > s2 with gaps d > 0.
    d1, d2, base = sp.symbols("d1 d2 base", positive=True)
    sub = {s[0]: base + d1 + d2, s[1]: base + d2, s[2]: base}
    soft = [(sp.exp(eta * s[b]) / Z).subs(sub) for b in range(M)]
    rewritten = 1 / (1 + sp.exp(-eta * d1) + sp.exp(-eta * (d1 + d2)))
    equal("p_max = 1/(1 + sum_c exp(-eta (s_max - s_c)))", soft[0], rewritten)
    equal("eta->inf: p_max -> 1", sp.limit(rewritten, eta, sp.oo), 1)
    for b in (1, 2):
        equal(f"eta->inf: p_{b} -> 0", sp.limit(sp.simplify(soft[b]), eta, sp.oo), 0)
    # Ties: two maxima share the mass.
    tie = {s[0]: base + d1, s[1]: base + d1, s[2]: base}
    p_tie = sp.simplify((sp.exp(eta * s[0]) / Z).subs(tie))
    equal("two tied maxima: p -> 1/2 each", sp.limit(p_tie, eta, sp.oo), sp.Rational(1, 2))


if __name__ == "__main__":
    stationarity()
    concavity()
    limits()
    finish()
