"""Check every algebraic step of proofs/07_deficit.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import itertools

import sympy as sp
from _steps import equal, finish

M = 3


def pointwise_identities() -> None:
    """‖g_S‖² = ⟨g, g_S⟩ = Σ X a, ‖g − g_S‖² = Σ (1 − X) a, ⟨g_S, g − g_S⟩ = 0 for every subset S."""
    g = [sp.Matrix(sp.symbols(f"g{b}_0:2", real=True)) for b in range(M)]
    a = [gb.dot(gb) for gb in g]
    for subset in itertools.product((0, 1), repeat=M):
        gs = [subset[b] * g[b] for b in range(M)]
        tag = "".join(map(str, subset))
        equal(f"S={tag}: |g_S|^2 = sum X a", sum(v.dot(v) for v in gs), sum(subset[b] * a[b] for b in range(M)))
        equal(f"S={tag}: <g, g_S> = sum X a", sum(g[b].dot(gs[b]) for b in range(M)),
              sum(subset[b] * a[b] for b in range(M)))
        equal(f"S={tag}: |g - g_S|^2 = sum (1-X) a", sum((g[b] - gs[b]).dot(g[b] - gs[b]) for b in range(M)),
              sum((1 - subset[b]) * a[b] for b in range(M)))
        equal(f"S={tag}: <g_S, g - g_S> = 0", sum(gs[b].dot(g[b] - gs[b]) for b in range(M)), 0)


def expectations_under_any_joint_law() -> None:
    """E over a general law on the 8 subsets: C = Σ π a, D = Σ (1 − π) a, C + D = Σ a."""
    subsets = list(itertools.product((0, 1), repeat=M))
    p = sp.symbols(f"p0:{len(subsets)}", nonnegative=True)
    law = {p[-1]: 1 - sum(p[:-1])}  # probabilities sum to one
    a = sp.symbols(f"a0:{M}", nonnegative=True)
    pi = [sum(p[k] * s[b] for k, s in enumerate(subsets)) for b in range(M)]
    cap = sum(p[k] * sum(s[b] * a[b] for b in range(M)) for k, s in enumerate(subsets))
    dfc = sum(p[k] * sum((1 - s[b]) * a[b] for b in range(M)) for k, s in enumerate(subsets))
    equal("E sum X a = sum pi a", cap.subs(law), sum(pi[b] * a[b] for b in range(M)).subs(law))
    equal("E sum (1-X) a = sum (1 - pi) a", dfc.subs(law), sum((1 - pi[b]) * a[b] for b in range(M)).subs(law))
    equal("C + D = sum a", (cap + dfc).subs(law), sum(a))
    # Layers {0, 1} and {2}: modules 0 and 1 share a switch, so only subsets with s0 = s1 have mass.
    shared = {p[k]: 0 for k, s in enumerate(subsets) if s[0] != s[1] and k != len(subsets) - 1}
    law2 = {**shared, p[-1]: 1 - sum(v for k, v in enumerate(p[:-1]) if v not in shared)}
    pi_l = [pi[0].subs(law2), pi[2].subs(law2)]
    equal("layers: pi_0 = pi_1", pi[0].subs(law2), pi[1].subs(law2))
    equal("layers: D = A_0 (1 - pi_l0) + A_2 (1 - pi_l1)", dfc.subs(law2),
          (a[0] + a[1]) * (1 - pi_l[0]) + a[2] * (1 - pi_l[1]))


def adam_scale_invariance(steps: int = 3) -> None:
    """m_t(c) = c m_t(1), v_t(c) = c² v_t(1), so the bias-corrected step with ε equals the unscaled one with ε/c."""
    c, eps = sp.symbols("c epsilon", positive=True)
    b1, b2 = sp.symbols("beta1 beta2", positive=True)
    h = sp.symbols(f"h1:{steps + 1}", real=True)

    def run(scale: sp.Expr) -> tuple[list[sp.Expr], list[sp.Expr]]:
        m, v, ms, vs = sp.Integer(0), sp.Integer(0), [], []
        for t in range(steps):
            m = b1 * m + (1 - b1) * scale * h[t]
            v = b2 * v + (1 - b2) * scale**2 * h[t] ** 2
            ms.append(m)
            vs.append(v)
        return ms, vs

    mc, vc = run(c)
    m1, v1 = run(sp.Integer(1))
    for t in range(steps):
        equal(f"t={t + 1}: m_t(c) = c m_t(1)", mc[t], c * m1[t])
        equal(f"t={t + 1}: v_t(c) = c^2 v_t(1)", vc[t], c**2 * v1[t])
        k1, k2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        # √(c² v) = c √v for c > 0, v ≥ 0: write v_t(1) = w² with w ≥ 0 to let sympy take the root.
        w = sp.symbols("w", nonnegative=True)
        step_c = (c * m1[t] / k1) / (sp.sqrt(c**2 * w**2 / k2) + eps)
        step_1 = (m1[t] / k1) / (sp.sqrt(w**2 / k2) + eps / c)
        equal(f"t={t + 1}: Adam step on c*h with eps = step on h with eps/c", step_c, step_1)
        equal(f"t={t + 1}: eps = 0: the step does not depend on c",
              step_c.subs(eps, 0), ((m1[t] / k1) / sp.sqrt(w**2 / k2)))


if __name__ == "__main__":
    pointwise_identities()
    expectations_under_any_joint_law()
    adam_scale_invariance()
    finish()
