"""Check every algebraic step of proofs/08_deficit_optimal.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

R = sp.Rational
M = 3


def substitution_with_floor() -> None:
    """π = f + (1 − f)x turns the box [f, 1] into [0, 1] and the budget into B' = (B − fΣn)/(1 − f)."""
    f, B = sp.symbols("f B", positive=True)
    a = sp.symbols(f"a0:{M}", nonnegative=True)
    n = sp.symbols(f"n0:{M}", positive=True)
    x = sp.symbols(f"x0:{M}", real=True)
    pi = [f + (1 - f) * x[b] for b in range(M)]
    equal("sum a pi = f sum a + (1-f) sum a x", sum(a[b] * pi[b] for b in range(M)),
          f * sum(a) + (1 - f) * sum(a[b] * x[b] for b in range(M)))
    budget_pi = sum(n[b] * pi[b] for b in range(M)) - B
    budget_x = (1 - f) * (sum(n[b] * x[b] for b in range(M)) - (B - f * sum(n)) / (1 - f))
    equal("sum n pi - B = (1-f)(sum n x - B')", budget_pi, budget_x)
    equal("x = 0 -> pi = f, x = 1 -> pi = 1", sp.Matrix([pi[0].subs(x[0], 0), pi[0].subs(x[0], 1)]),
          sp.Matrix([f, 1]))


def weak_duality() -> None:
    """λB' + Σμ − Σ a x = λ(B' − Σ n x) + Σ μ(1 − x) + Σ x(μ + λn − a)."""
    lam, B = sp.symbols("lambda B", nonnegative=True)
    a = sp.symbols(f"a0:{M}", nonnegative=True)
    n = sp.symbols(f"n0:{M}", positive=True)
    x = sp.symbols(f"x0:{M}", real=True)
    mu = sp.symbols(f"mu0:{M}", nonnegative=True)
    lhs = lam * B + sum(mu) - sum(a[b] * x[b] for b in range(M))
    rhs = (lam * (B - sum(n[b] * x[b] for b in range(M))) + sum(mu[b] * (1 - x[b]) for b in range(M))
           + sum(x[b] * (mu[b] + lam * n[b] - a[b]) for b in range(M)))
    equal("dual - primal = sum of products of non-negatives", lhs, rhs)


def greedy_has_zero_gap() -> None:
    """Sorted ρ0 ≥ ρ1 ≥ ρ2, budget between n0 and n0 + n1: module 1 is the marginal one."""
    n = sp.symbols(f"n0:{M}", positive=True)
    r2, d1, d0 = sp.symbols("rho2 d1 d0", nonnegative=True)
    rho = [r2 + d1 + d0, r2 + d1, r2]  # ρ0 ≥ ρ1 ≥ ρ2 by construction
    a = [rho[b] * n[b] for b in range(M)]
    t = sp.symbols("t", positive=True)  # B = n0 + t·n1, 0 < t < 1
    B = n[0] + t * n[1]
    x = [1, (B - n[0]) / n[1], 0]
    equal("greedy: x_1 = t", x[1], t)
    equal("greedy spends the budget", sum(n[b] * x[b] for b in range(M)), B)
    lam = rho[1]
    mu = [n[0] * (rho[0] - lam), 0, 0]  # n_b (ρ_b − λ)_+
    equal("mu_0 = a_0 - lambda n_0 (tight dual constraint)", mu[0], a[0] - lam * n[0])
    holds("mu_0 = n0 d0 >= 0", sp.ask(sp.Q.nonnegative(sp.expand(mu[0]))))
    holds("module 2: a_2 - lambda n_2 = -n2 d1 <= 0 so mu_2 = 0 is feasible",
          sp.ask(sp.Q.nonpositive(sp.expand(a[2] - lam * n[2]))))
    primal = sum(a[b] * x[b] for b in range(M))
    dual = lam * B + sum(mu)
    equal("dual value = primal value (zero gap)", dual, primal)
    for b in range(M):  # complementary slackness
        equal(f"slackness x_{b}(mu_{b} + lambda n_{b} - a_{b}) = 0", x[b] * (mu[b] + lam * n[b] - a[b]), 0)
        equal(f"slackness mu_{b}(1 - x_{b}) = 0", mu[b] * (1 - x[b]), 0)


def rational_instance_with_floor() -> None:
    """a = (6, 2, 9, 0), n = (2, 1, 3, 2), f = 1/4, B = 4: every π ≥ 1/4, the rest greedy by ρ = (3, 2, 3, 0)."""
    a, n, f, B = [6, 2, 9, 0], [2, 1, 3, 2], R(1, 4), 4
    Bp = (B - f * sum(n)) / (1 - f)
    equal("B' = (4 - 2)/(3/4) = 8/3", Bp, R(8, 3))
    # ρ ties (modules 0 and 2 at 3) share one level: x = (8/3)/(2 + 3) = 8/15 each; the others 0.
    x = [R(8, 15), 0, R(8, 15), 0]
    equal("tied top modules share B'", n[0] * x[0] + n[2] * x[2], Bp)
    pi = [f + (1 - f) * v for v in x]
    equal("pi = (13/20, 1/4, 13/20, 1/4)", sp.Matrix(pi), sp.Matrix([R(13, 20), f, R(13, 20), f]))
    equal("budget spent", sum(n[b] * pi[b] for b in range(4)), B)
    lam = R(3)
    primal = sum(a[b] * x[b] for b in range(4))
    dual = lam * Bp + sum(max(a[b] - lam * n[b], 0) for b in range(4))
    equal("zero duality gap at lambda = 3", primal, dual)
    deficit = sum(a[b] * (1 - pi[b]) for b in range(4))
    equal("D* = 17 - 6*13/20 - 2/4 - 9*13/20 = 6.75", deficit, R(27, 4))


if __name__ == "__main__":
    substitution_with_floor()
    weak_duality()
    greedy_has_zero_gap()
    rational_instance_with_floor()
    finish()
