"""Check every algebraic step of proofs/02_optimal_inclusion.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

R = sp.Rational


def convexity_and_stationarity() -> None:
    """Second derivative, stationarity, the three KKT cases and the clip formula."""
    a, n, lam, pi, f = sp.symbols("a n lambda pi f", positive=True)
    mu, nu = sp.symbols("mu nu", nonnegative=True)
    obj = a / pi
    equal("d2/dpi2 (a/pi) = 2a/pi^3 (>= 0: convex)", sp.diff(obj, pi, 2), 2 * a / pi**3)
    lag = obj + lam * (pi * n) + mu * (pi - 1) + nu * (f - pi)
    stat = sp.diff(lag, pi)
    equal("stationarity: dL/dpi = -a/pi^2 + lambda n + mu - nu", stat, -a / pi**2 + lam * n + mu - nu)
    sols = sp.solve(stat.subs({mu: 0, nu: 0}), pi)
    holds("interior: unique positive root", len(sols) == 1)
    t = sp.sqrt(a / (lam * n))
    equal("interior: pi = sqrt(a/(lambda n))", sols[0], t)
    mu_cap = sp.solve(stat.subs({pi: 1, nu: 0}), mu)[0]
    equal("cap: mu = a - lambda n", mu_cap, a - lam * n)
    # mu >= 0 <=> a >= lambda n <=> t >= 1: compare squares, both sides positive.
    equal("cap: mu/(lambda n) = t^2 - 1  (so mu >= 0 iff t >= 1)", mu_cap / (lam * n), t**2 - 1)
    nu_floor = sp.solve(stat.subs({pi: f, mu: 0}), nu)[0]
    equal("floor: nu = lambda n - a/f^2", nu_floor, lam * n - a / f**2)
    equal("floor: nu f^2/(lambda n) = f^2 - t^2  (so nu >= 0 iff t <= f)", nu_floor * f**2 / (lam * n), f**2 - t**2)
    equal("interior ratio sqrt(a/n)/pi = sqrt(lambda)", sp.sqrt(a / n) / t, sp.sqrt(lam))
    equal("h'(lambda) contribution d(n t)/dlambda = -n t/(2 lambda) (< 0: water level monotone)",
          sp.diff(n * t, lam), -n * t / (2 * lam))


def uncapped_closed_form() -> None:
    """Budget equation, lambda, pi and the optimum value, for M=3 symbolic modules."""
    m = 3
    a = sp.symbols(f"a0:{m}", positive=True)
    n = sp.symbols(f"n0:{m}", positive=True)
    lam, B = sp.symbols("lambda B", positive=True)
    s = sum(sp.sqrt(a[b] * n[b]) for b in range(m))
    t = [sp.sqrt(a[b] / (lam * n[b])) for b in range(m)]
    equal("sum n_b t_b = lambda^(-1/2) sum sqrt(a_b n_b)", sum(n[b] * t[b] for b in range(m)), s / sp.sqrt(lam))
    lam_star = sp.solve(sp.Eq(s / sp.sqrt(lam), B), lam)
    holds("budget equation has a single positive lambda", len(lam_star) == 1)
    equal("sqrt(lambda*) = sum sqrt(a n)/B", sp.sqrt(lam_star[0]), s / B)
    pi = [t[b].subs(lam, lam_star[0]) for b in range(m)]
    for b in range(m):
        equal(f"pi_{b} = B sqrt(a_{b}/n_{b}) / sum sqrt(a n)", pi[b], B * sp.sqrt(a[b] / n[b]) / s)
    equal("budget is met with equality: sum pi n = B", sum(pi[b] * n[b] for b in range(m)), B)
    value = sum(a[b] / pi[b] for b in range(m))
    equal("sum a/pi = (sum sqrt(a n))^2 / B", value, s**2 / B)
    equal("V* = (sum sqrt(a n))^2/B - sum a", value - sum(a), s**2 / B - sum(a))


def cauchy_schwarz_certificate() -> None:
    """Lagrange's identity (sum x^2)(sum y^2) - (sum xy)^2 = sum_{i<j} (x_i y_j - x_j y_i)^2 >= 0, then the bound."""
    m = 3
    x = sp.symbols(f"x0:{m}", real=True)
    y = sp.symbols(f"y0:{m}", real=True)
    lhs = sum(v**2 for v in x) * sum(v**2 for v in y) - sum(x[i] * y[i] for i in range(m)) ** 2
    rhs = sum((x[i] * y[j] - x[j] * y[i]) ** 2 for i in range(m) for j in range(i + 1, m))
    equal("Lagrange identity (M=3)", lhs, rhs)
    a = sp.symbols(f"a0:{m}", positive=True)
    n = sp.symbols(f"n0:{m}", positive=True)
    p = sp.symbols(f"p0:{m}", positive=True)
    # x_b = sqrt(a_b/pi_b), y_b = sqrt(pi_b n_b): x_b y_b = sqrt(a_b n_b).
    for b in range(m):
        equal(f"x_{b} y_{b} = sqrt(a_{b} n_{b})", sp.sqrt(a[b] / p[b]) * sp.sqrt(p[b] * n[b]), sp.sqrt(a[b] * n[b]))
    gap = (sum(a[b] / p[b] for b in range(m)) * sum(p[b] * n[b] for b in range(m))
           - sum(sp.sqrt(a[b] * n[b]) for b in range(m)) ** 2)
    sos = sum((sp.sqrt(a[i] / p[i]) * sp.sqrt(p[j] * n[j]) - sp.sqrt(a[j] / p[j]) * sp.sqrt(p[i] * n[i])) ** 2
              for i in range(m) for j in range(i + 1, m))
    equal("(sum a/pi)(sum pi n) - (sum sqrt(a n))^2 = sum of squares (>= 0)", gap, sos)


def rational_instances() -> None:
    """Exact instances with an active cap and an active floor: primal feasibility, dual feasibility, slackness."""
    # Cap: a = (100, 1, 1), n = (1, 1, 1), B = 2.  Module 0 capped; the others share the remaining unit.
    a, n, B = [100, 1, 1], [1, 1, 1], 2
    lam = sp.Integer(4)
    pi = [min(max(sp.sqrt(R(a[b]) / (lam * n[b])), 0), 1) for b in range(3)]
    equal("cap instance: pi = (1, 1/2, 1/2)", sp.Matrix(pi), sp.Matrix([1, R(1, 2), R(1, 2)]))
    equal("cap instance: budget tight", sum(pi[b] * n[b] for b in range(3)), B)
    mu0 = a[0] - lam * n[0]
    holds("cap instance: mu_0 = a_0 - lambda n_0 = 96 >= 0", mu0 == 96 and mu0 >= 0)
    for b in (1, 2):
        equal(f"cap instance: stationarity module {b}", -R(a[b]) / pi[b] ** 2 + lam * n[b], 0)
    uncapped = R(2) * 10 / (10 + 1 + 1)
    holds("cap instance: the uncapped formula would give pi_0 = 5/3 > 1", uncapped == R(5, 3) and uncapped > 1)
    # Any feasible perturbation that keeps the budget, e.g. (1, 1/2+e, 1/2-e), is worse.
    e = sp.symbols("e", positive=True)
    worse = 100 + 1 / (R(1, 2) + e) + 1 / (R(1, 2) - e) - (100 + 4)
    equal("cap instance: a budget-keeping perturbation costs 16e^2/(1-4e^2) > 0", worse, 16 * e**2 / (1 - 4 * e**2))

    # Floor: a = (9, 9, 0.0001), n = (1, 1, 1), f = 1/10, B = 1.
    a = [9, 9, R(1, 10000)]
    f = R(1, 10)
    B = 1
    # Two interior modules share B - f = 9/10: pi = 9/20 each, so sqrt(9/lambda) = 9/20 -> lambda = 400/9.
    lam = R(400, 9)
    t = [sp.sqrt(R(a[b]) / lam) for b in range(3)]
    pi = [min(max(tb, f), 1) for tb in t]
    equal("floor instance: pi = (9/20, 9/20, 1/10)", sp.Matrix(pi), sp.Matrix([R(9, 20), R(9, 20), f]))
    equal("floor instance: budget tight", sum(pi), B)
    nu2 = lam - a[2] / f**2
    holds("floor instance: nu_2 = lambda - a_2/f^2 >= 0", nu2 == R(400, 9) - R(1, 100) and nu2 >= 0)
    ratios = [sp.sqrt(R(a[b])) / pi[b] for b in range(3)]
    equal("floor instance: interior ratio = sqrt(lambda)", ratios[0], sp.sqrt(lam))
    holds("floor instance: floored module ratio < sqrt(lambda)", ratios[2] < sp.sqrt(lam))


if __name__ == "__main__":
    convexity_and_stationarity()
    uncapped_closed_form()
    cauchy_schwarz_certificate()
    rational_instances()
    finish()
