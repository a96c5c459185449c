"""Check every algebraic step of proofs/05_convergence.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

alpha, alpha0, L, R, rho, pimin, D0 = sp.symbols("alpha alpha0 L R rho pi_min Delta0", positive=True)
T, K, t = sp.symbols("T K t", positive=True, integer=True)


def inner_step() -> None:
    """Step 1: descent lemma with y - x = -alpha P u, then (A6) and (A4) on the two terms."""
    gu, u2, gB2 = sp.symbols("gu u2 gB2", real=True)  # <grad, Pu>, ||Pu||^2, ||P grad||^2
    lemma = -alpha * gu + L / 2 * alpha**2 * u2  # f(y) - f(x) bound
    # (A6) gu >= rho gB2 and (A4) u2 <= R^2 make the bound increase when replaced: check the differences
    after = -alpha * rho * gB2 + L * alpha**2 * R**2 / 2
    diff = sp.expand(after - lemma)  # = alpha (gu - rho gB2) + L alpha^2 (R^2 - u2)/2 >= 0
    equal("step 1: bound difference = alpha(gu - rho gB2) + L alpha^2 (R^2 - u2)/2", diff,
          alpha * (gu - rho * gB2) + L * alpha**2 * (R**2 - u2) / 2)


def drift() -> None:
    """Step 2: ||sum_{s<t} x_s||^2 <= t sum ||x_s||^2 (checked as a sum of squares for t = 2, 3, 4)."""
    for n in (2, 3, 4):
        xs = sp.symbols(f"x0:{n}", real=True)
        gap = n * sum(x**2 for x in xs) - sum(xs) ** 2
        sos = sum((xs[i] - xs[j]) ** 2 for i in range(n) for j in range(i + 1, n))
        equal(f"step 2: t·Σx² - (Σx)² = Σ_(i<j)(x_i - x_j)² for t={n}", gap, sos)
    equal("step 2: alpha^2 * t * (t R^2) = alpha^2 t^2 R^2", alpha**2 * t * (t * R**2), alpha**2 * t**2 * R**2)


def young() -> None:
    """Step 3: 2||b||^2 + 2||a-b||^2 - ||a||^2 = ||a - 2b||^2 (3-dim symbolic vectors)."""
    a = sp.Matrix(sp.symbols("a0:3", real=True))
    b = sp.Matrix(sp.symbols("b0:3", real=True))
    sq = lambda v: (v.T * v)[0]  # noqa: E731
    equal("step 3: 2|b|^2 + 2|a-b|^2 - |a|^2 = |a-2b|^2", 2 * sq(b) + 2 * sq(a - b) - sq(a), sq(a - 2 * b))
    # -|b|^2 <= -|a|^2/2 + |a-b|^2 and |a-b|^2 <= L^2 alpha^2 t^2 R^2
    equal("step 3: rearranged: -|b|^2 = -|a|^2/2 + |a-b|^2 - |a-2b|^2/2", -sq(b),
          -sq(a) / 2 + sq(a - b) - sq(a - 2 * b) / 2)


def period() -> None:
    """Step 4: sum over t of the per-step bound, with sum t^2 = (T-1)T(2T-1)/6."""
    s = sp.symbols("s", integer=True, nonnegative=True)
    S_T = (T - 1) * T * (2 * T - 1) / 6
    equal("step 4: sum_{t<T} t^2 = (T-1)T(2T-1)/6", sp.summation(s**2, (s, 0, T - 1)), S_T)
    hk = sp.symbols("h_k", nonnegative=True)  # E||P_B grad f(theta_k)||^2
    per_step = -alpha * rho * (hk / 2 - L**2 * alpha**2 * s**2 * R**2) + L * alpha**2 * R**2 / 2
    total = sp.summation(per_step, (s, 0, T - 1))
    equal("step 4: summed bound", total,
          -alpha * rho * T / 2 * hk + T * L * alpha**2 * R**2 / 2 + rho * L**2 * R**2 * S_T * alpha**3)


def sampling() -> None:
    """Step 5: sum pi_b h_b - pi_min sum h_b = sum (pi_b - pi_min) h_b, and it is >= 0 for pi_b >= pi_min."""
    h = sp.symbols("h0:4", nonnegative=True)
    e = sp.symbols("e0:4", nonnegative=True)  # pi_b = pi_min + e_b
    pis = [pimin + x for x in e]
    lhs = sum(p * x for p, x in zip(pis, h, strict=True)) - pimin * sum(h)
    equal("step 5: Σπh − π_min Σh = Σ(π−π_min)h", lhs, sum(x * y for x, y in zip(e, h, strict=True)))
    holds("step 5: Σ e_b h_b ≥ 0 for e, h ≥ 0 (sympy sign inference)", sp.expand(lhs).is_nonnegative is True)


def telescope_and_rate() -> None:
    """Steps 6-7: telescoping, alpha = alpha0/sqrt(K), the constant C, the optimal alpha0."""
    S_T = (T - 1) * T * (2 * T - 1) / 6
    c1, c2, c3 = rho * T * pimin / 2, T * L * R**2 / 2, rho * L**2 * R**2 * S_T
    # c1 α K avg <= Δ0 + K c2 α² + K c3 α³  ⇔  avg <= Δ0/(c1 α K) + c2 α/c1 + c3 α²/c1
    bound6 = D0 / (c1 * alpha * K) + c2 / c1 * alpha + c3 / c1 * alpha**2
    equal("step 6: divide the telescoped sum by c1 α K",
          (D0 + K * c2 * alpha**2 + K * c3 * alpha**3) / (c1 * alpha * K),
          bound6)
    b7 = bound6.subs(alpha, alpha0 / sp.sqrt(K))
    equal("step 7: substitution α = α0/√K", b7,
          (D0 / (c1 * alpha0) + c2 * alpha0 / c1) / sp.sqrt(K) + c3 * alpha0**2 / (c1 * K))
    C = D0 / (c1 * alpha0) + c2 * alpha0 / c1 + c3 * alpha0**2 / c1
    equal("step 7: C in the original constants", C,
          2 * D0 / (rho * T * pimin * alpha0) + L * R**2 * alpha0 / (rho * pimin)
          + 2 * L**2 * R**2 * S_T * alpha0**2 / (T * pimin))
    # C/√K - bound = c3 α0²/c1 (1/√K - 1/K) ≥ 0 for K ≥ 1
    gap = sp.simplify(C / sp.sqrt(K) - b7)
    equal("step 7: C/√K − bound = (c3 α0²/c1)(1/√K − 1/K)", gap, c3 * alpha0**2 / c1 * (1 / sp.sqrt(K) - 1 / K))
    k = sp.symbols("k", positive=True)
    holds("step 7: 1/√K − 1/K ≥ 0 for K ≥ 1 (K = k², k ≥ 1: (k−1)/k² ≥ 0)",
          sp.simplify((1 / sp.sqrt(k**2) - 1 / k**2) - (k - 1) / k**2) == 0)
    lead = sp.limit(sp.sqrt(K) * b7, K, sp.oo)
    equal("step 7: √K · bound → Δ0/(c1 α0) + c2 α0/c1", lead, D0 / (c1 * alpha0) + c2 * alpha0 / c1)
    a_star = sp.sqrt(D0 / c2)
    equal("step 7: d/dα0 of the leading constant vanishes at α0* = √(Δ0/c2)",
          sp.diff(D0 / (c1 * alpha0) + c2 * alpha0 / c1, alpha0).subs(alpha0, a_star), 0)
    equal("step 7: α0* = √(2Δ0/(T L R²))", a_star, sp.sqrt(2 * D0 / (T * L * R**2)))
    equal("step 7: leading constant at α0* = 2√(Δ0 c2)/c1",
          (D0 / (c1 * alpha0) + c2 * alpha0 / c1).subs(alpha0, a_star), 2 * sp.sqrt(D0 * c2) / c1)
    holds("step 7: second derivative > 0 (minimum)",
          sp.simplify(sp.diff(D0 / (c1 * alpha0) + c2 * alpha0 / c1, alpha0, 2)).is_positive)
    holds("rate: log-slope of C/√K in K is −1/2",
          sp.simplify(sp.diff(sp.log(C / sp.sqrt(K)), K) * K) == sp.Rational(-1, 2))


if __name__ == "__main__":
    inner_step()
    drift()
    young()
    period()
    sampling()
    telescope_and_rate()
    finish()
