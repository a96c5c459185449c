"""Check every algebraic step of proofs/10_deficit_modulewise_vs_layerwise.md with sympy; exit 1 if one fails."""

from __future__ import annotations

import sympy as sp
from _steps import equal, finish, holds

R = sp.Rational


def layer_design_is_a_module_design() -> None:
    """Deficit, budget and regulariser of a layer-constant π add up to the layer-level quantities."""
    a = sp.symbols("a0:3", nonnegative=True)
    n = sp.symbols("n0:3", positive=True)
    pl, delta = sp.symbols("pi_l delta", positive=True)
    A, N = sum(a), sum(n)
    equal("sum_{b in l} a_b (1 - pi_l) = A_l (1 - pi_l)", sum(x * (1 - pl) for x in a), A * (1 - pl))
    equal("sum_{b in l} n_b pi_l = N_l pi_l", sum(x * pl for x in n), N * pl)
    phi = pl * sp.log(pl / delta) - pl + delta
    equal("sum_{b in l} n_b phi(pi_l) = N_l phi(pi_l)", sum(x * phi for x in n), N * phi)


def equal_density_gives_equal_optima() -> None:
    """ρ constant per layer: module-wise greedy with ties sharing spends the same per-parameter level in a layer."""
    n = sp.symbols("n0:4", positive=True)
    r0, d = sp.symbols("rho1 d", positive=True)
    rho = [r0 + d, r0 + d, r0, r0]  # layer 0 = modules 0, 1 (denser), layer 1 = modules 2, 3
    a = [rho[b] * n[b] for b in range(4)]
    t = sp.symbols("t", positive=True)  # B = t (n0 + n1), 0 < t < 1: layer 0 is the marginal one
    B = t * (n[0] + n[1])
    # module-wise greedy: modules 0 and 1 tie, so they share B equally per parameter (level t); 2, 3 get 0
    pi_mod = [t, t, 0, 0]
    equal("module greedy spends B", sum(n[b] * pi_mod[b] for b in range(4)), B)
    cap_mod = sum(a[b] * pi_mod[b] for b in range(4))
    # layer-wise greedy: layer densities ρ0 + d > ρ1, layer 0 gets π = B/N_0 = t
    A0, N0 = a[0] + a[1], n[0] + n[1]
    equal("layer 0 density = rho0 + d", sp.simplify(A0 / N0), r0 + d)
    cap_lay = A0 * (B / N0)
    equal("captured (so deficit) equal: module optimum is layer-constant", cap_mod, cap_lay)
    # the module-wise value is optimal (08): dual λ = ρ0 + d, μ = 0 for all, value λB
    equal("module-wise dual value lambda B = captured", (r0 + d) * B, cap_mod)


def strict_instance() -> None:
    """{(4,1),(0,1)}, {(1,1),(1,1)}, B = 1: D*_module = 2 < D*_layer = 4."""
    a, n, B = [4, 0, 1, 1], [1, 1, 1, 1], 1
    total = sum(a)
    pi_mod = [1, 0, 0, 0]  # greedy by ρ = (4, 0, 1, 1)
    d_mod = sum(a[b] * (1 - pi_mod[b]) for b in range(4))
    lam = 1  # module 0 fills the budget exactly; any λ between the next density (1) and 4 certifies it
    dual = lam * B + sum(max(a[b] - lam * n[b], 0) for b in range(4))
    equal("module-wise captured = dual bound = 4", total - d_mod, dual)
    A, N = [4, 2], [2, 2]
    pi_lay = [R(B, N[0]), 0]  # layer densities 2 > 1: layer 0 takes the whole budget
    d_lay = total - sum(A[i] * pi_lay[i] for i in range(2))
    lam_l = R(2)
    dual_l = lam_l * B + sum(max(A[i] - lam_l * N[i], 0) for i in range(2))
    equal("layer-wise captured = its dual bound = 2", total - d_lay, dual_l)
    equal("D*_module = 2", d_mod, 2)
    equal("D*_layer = 4", d_lay, 4)
    holds("D*_module < D*_layer", d_mod < d_lay)


if __name__ == "__main__":
    layer_design_is_a_module_design()
    equal_density_gives_equal_optima()
    strict_instance()
    finish()
