"""Check every algebraic step of proofs/03_modulewise_vs_layerwise.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

R = sp.Rational


def layerwise_is_the_same_problem() -> None:
    """A layer with shared pi contributes A_l/pi_l to sum a/pi and N_l pi_l to the budget."""
    a = sp.symbols("a0:3", positive=True)
    n = sp.symbols("n0:3", positive=True)
    pl = sp.symbols("pi_l", positive=True)
    equal("sum_{b in l} a_b/pi_l = A_l/pi_l", sum(a[b] / pl for b in range(3)), sum(a) / pl)
    equal("sum_{b in l} n_b pi_l = N_l pi_l", sum(n[b] * pl for b in range(3)), sum(n) * pl)


def cauchy_schwarz_in_a_layer() -> None:
    """Lagrange's identity for a 3-module layer, in terms of a and n."""
    a = sp.symbols("a0:3", positive=True)
    n = sp.symbols("n0:3", positive=True)
    A, N = sum(a), sum(n)
    s = sum(sp.sqrt(a[b] * n[b]) for b in range(3))
    sos = sum((sp.sqrt(a[b] * n[c]) - sp.sqrt(a[c] * n[b])) ** 2 for b in range(3) for c in range(b + 1, 3))
    equal("A_l N_l - (sum sqrt(a n))^2 = sum_{b<c} (sqrt(a_b n_c) - sqrt(a_c n_b))^2", A * N - s**2, sos)
    # Equality case: a_b = k n_b for every b in the layer.
    k = sp.symbols("k", positive=True)
    proportional = {a[b]: k * n[b] for b in range(3)}
    equal("a_b = k n_b  =>  sum sqrt(a n) = sqrt(A N)", (s - sp.sqrt(A * N)).subs(proportional), 0)
    # Conversely a vanishing square forces equal ratios: sqrt(a_b n_c) = sqrt(a_c n_b) <=> a_b/n_b = a_c/n_c.
    equal("(sqrt(a0 n1))^2 - (sqrt(a1 n0))^2 = n0 n1 (a0/n0 - a1/n1)",
          sp.sqrt(a[0] * n[1]) ** 2 - sp.sqrt(a[1] * n[0]) ** 2, n[0] * n[1] * (a[0] / n[0] - a[1] / n[1]))


def the_gap() -> None:
    """Two layers {0,1}, {2,3}: gap identity, factorisation and sign."""
    a = sp.symbols("a0:4", positive=True)
    n = sp.symbols("n0:4", positive=True)
    B = sp.symbols("B", positive=True)
    layers = [(0, 1), (2, 3)]
    A = [sum(a[b] for b in lay) for lay in layers]
    N = [sum(n[b] for b in lay) for lay in layers]
    s_mod = sum(sp.sqrt(a[b] * n[b]) for b in range(4))
    s_lay = sum(sp.sqrt(A[i] * N[i]) for i in range(2))
    v_mod = s_mod**2 / B - sum(a)
    v_lay = s_lay**2 / B - sum(a)
    equal("V_layer - V_module = ((sum_l sqrt(A N))^2 - (sum_b sqrt(a n))^2)/B", v_lay - v_mod,
          (s_lay**2 - s_mod**2) / B)
    equal("difference of squares: = (s_lay - s_mod)(s_lay + s_mod)/B", (s_lay**2 - s_mod**2) / B,
          (s_lay - s_mod) * (s_lay + s_mod) / B)
    # Equality: constant ratio inside each layer (different constants between layers).
    k0, k1 = sp.symbols("k0 k1", positive=True)
    equal("a_b/n_b = k_l within each layer => gap = 0",
          ((s_lay**2 - s_mod**2) / B).subs({a[0]: k0 * n[0], a[1]: k0 * n[1], a[2]: k1 * n[2], a[3]: k1 * n[3]}), 0)
    # A strict exact instance: layer 0 has unequal ratios.
    inst = {a[0]: 4, n[0]: 1, a[1]: 1, n[1]: 4, a[2]: 1, n[2]: 1, a[3]: 1, n[3]: 1, B: 2}
    gap = sp.nsimplify(((s_lay**2 - s_mod**2) / B).subs(inst))
    equal("instance: s_mod = 2+2+1+1 = 6, s_lay = 5+2 = 7, gap = (49-36)/2", gap, R(13, 2))
    holds("instance: gap > 0", gap > 0)


def capped_inclusion_argument() -> None:
    """The layer-wise feasible set embeds into the module-wise one (exact instance check of both constraints)."""
    n = [R(3), R(5), R(2)]
    pl, B, f = R(2, 5), R(4), R(1, 10)
    pi = [pl, pl, pl]
    used = sum(p * m for p, m in zip(pi, n, strict=True))
    holds("layer-wise pi also satisfies the module-wise budget", used == pl * sum(n) <= B)
    holds("and the module-wise box", all(f <= p <= 1 for p in pi))


if __name__ == "__main__":
    layerwise_is_the_same_problem()
    cauchy_schwarz_in_a_layer()
    the_gap()
    capped_inclusion_argument()
    finish()
