"""Check every algebraic step of proofs/01_variance.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import itertools

import sympy as sp
from _steps import equal, finish


def bernoulli_moments() -> None:
    """E[(X/pi - 1)^2] = 1/pi - 1 and E[(X - 1)^2] = 1 - pi for X ~ Bernoulli(pi)."""
    pi = sp.symbols("pi", positive=True)
    x = sp.symbols("X")
    expect = lambda f: pi * f.subs(x, 1) + (1 - pi) * f.subs(x, 0)  # noqa: E731
    equal("E[X] = pi", expect(x), pi)
    equal("E[X^2] = pi", expect(x**2), pi)
    equal("E[(X/pi-1)^2] = pi(1/pi-1)^2 + (1-pi)", expect((x / pi - 1) ** 2), pi * (1 / pi - 1) ** 2 + (1 - pi))
    equal("pi(1/pi-1)^2 + (1-pi) = ((1-pi)^2 + pi(1-pi))/pi", pi * (1 / pi - 1) ** 2 + (1 - pi),
          ((1 - pi) ** 2 + pi * (1 - pi)) / pi)
    equal("((1-pi)^2 + pi(1-pi))/pi = 1/pi - 1", ((1 - pi) ** 2 + pi * (1 - pi)) / pi, 1 / pi - 1)
    equal("E[(X-1)^2] = 1 - pi", expect((x - 1) ** 2), 1 - pi)


def general_joint_law_three_modules() -> None:
    """M=3 blocks of dimension 2 under an arbitrary joint law on the 8 subsets."""
    m, dim = 3, 2
    subsets = list(itertools.product((0, 1), repeat=m))
    p = sp.symbols(f"p0:{len(subsets)}", positive=True)
    pi = sp.symbols(f"pi0:{m}", positive=True)
    # Parametrise the most general law by its marginals pi_b plus the 4 free "correlation" probabilities:
    # solve normalisation and the three marginal equations for the empty set and the singletons.
    pinned = [k for k, s in enumerate(subsets) if sum(s) <= 1]
    eqs = [sum(p) - 1] + [sum(p[k] for k, s in enumerate(subsets) if s[b]) - pi[b] for b in range(m)]
    p_sub = sp.solve(eqs, [p[k] for k in pinned], dict=True)[0]
    for b in range(m):
        equal(f"law has marginal P(b={b} in S) = pi_{b}",
              sum(p[k] for k, s in enumerate(subsets) if s[b]).subs(p_sub), pi[b])
    equal("law sums to 1", sum(p).subs(p_sub), 1)
    g = [sp.Matrix(sp.symbols(f"g{b}_0:{dim}", real=True)) for b in range(m)]
    a = [(gb.T * gb)[0] for gb in g]

    for b in range(m):
        mean = sum((p[k] * s[b] / pi[b] * g[b] for k, s in enumerate(subsets)), sp.zeros(dim, 1)).subs(p_sub)
        for j in range(dim):
            equal(f"unbiased: E[ghat_{b}][{j}] = g_{b}[{j}]", mean[j], g[b][j])

    def sq_err(s: tuple[int, ...], scaled: bool) -> sp.Expr:
        total = 0
        for b in range(m):
            coef = s[b] / pi[b] if scaled else s[b]
            d = coef * g[b] - g[b]
            total += (d.T * d)[0]
        return total

    var = sum(p[k] * sq_err(s, True) for k, s in enumerate(subsets)).subs(p_sub)
    rhs = sum(a[b] * (1 / pi[b] - 1) for b in range(m))
    equal("E||ghat-g||^2 = sum_b a_b (1/pi_b - 1)  [general joint law, M=3]", var, rhs)

    captured = sum(p[k] * sum(s[b] * a[b] for b in range(m)) for k, s in enumerate(subsets)).subs(p_sub)
    equal("captured E<gtilde, g> = sum_b pi_b a_b", captured, sum(pi[b] * a[b] for b in range(m)))
    captured_norm = sum(p[k] * sum(((s[b] * g[b]).T * (s[b] * g[b]))[0] for b in range(m))
                        for k, s in enumerate(subsets)).subs(p_sub)
    equal("captured also = E||gtilde||^2", captured_norm, captured)
    deficit = sum(p[k] * sq_err(s, False) for k, s in enumerate(subsets)).subs(p_sub)
    equal("deficit E||gtilde-g||^2 = sum_b (1-pi_b) a_b", deficit,
          sum((1 - pi[b]) * a[b] for b in range(m)))
    equal("captured + deficit = sum_b a_b = ||g||^2", captured + deficit, sum(a))


def groups_sharing_a_switch() -> None:
    """Modules {0,1} share switch G0, module {2} is G1; arbitrary joint law on the two switches."""
    q = sp.symbols("q0:4", positive=True)
    q_sub = {q[-1]: 1 - q[0] - q[1] - q[2]}
    laws = list(itertools.product((0, 1), repeat=2))
    a = sp.symbols("a0:3", nonnegative=True)
    group = (0, 0, 1)
    pi_g = [sum(q[k] for k, s in enumerate(laws) if s[G]) for G in range(2)]
    var = sum(q[k] * sum(a[b] * (s[group[b]] / pi_g[group[b]] - 1) ** 2 for b in range(3))
              for k, s in enumerate(laws)).subs(q_sub)
    per_module = sum(a[b] * (1 / pi_g[group[b]] - 1) for b in range(3)).subs(q_sub)
    per_group = ((a[0] + a[1]) * (1 / pi_g[0] - 1) + a[2] * (1 / pi_g[1] - 1)).subs(q_sub)
    equal("grouped: E||ghat-g||^2 = sum_b a_b (1/pi_G(b) - 1)", var, per_module)
    equal("grouped: = sum_G A_G (1/pi_G - 1)", per_module, per_group)
    captured = sum(q[k] * sum(a[b] * s[group[b]] for b in range(3)) for k, s in enumerate(laws)).subs(q_sub)
    deficit = sum(q[k] * sum(a[b] * (s[group[b]] - 1) ** 2 for b in range(3)) for k, s in enumerate(laws)).subs(q_sub)
    equal("grouped captured = sum_G pi_G A_G", captured, (pi_g[0] * (a[0] + a[1]) + pi_g[1] * a[2]).subs(q_sub))
    equal("grouped deficit = sum_G (1-pi_G) A_G", deficit,
          ((1 - pi_g[0]) * (a[0] + a[1]) + (1 - pi_g[1]) * a[2]).subs(q_sub))
    equal("grouped captured + deficit = sum a", captured + deficit, sum(a))


def general_identity() -> None:
    """Symbolic-length identity: sum_b a_b(1/pi_b - 1) = sum_b a_b/pi_b - sum_b a_b (the form optimised in 02)."""
    n = sp.symbols("n", integer=True, positive=True)
    b = sp.symbols("b", integer=True)
    a, pi = sp.IndexedBase("a"), sp.IndexedBase("pi")
    lhs = sp.Sum(a[b] * (1 / pi[b] - 1), (b, 1, n))
    rhs = sp.Sum(a[b] / pi[b], (b, 1, n)) - sp.Sum(a[b], (b, 1, n))
    equal("sum a(1/pi - 1) = sum a/pi - sum a  [any M]", sp.expand(lhs.doit()) - rhs.doit(), 0)
    equal("captured + deficit termwise: pi a + (1-pi) a = a", pi[b] * a[b] + (1 - pi[b]) * a[b], a[b])


if __name__ == "__main__":
    bernoulli_moments()
    general_joint_law_three_modules()
    groups_sharing_a_switch()
    general_identity()
    finish()
