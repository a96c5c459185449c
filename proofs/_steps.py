"""Shared bookkeeping for the proof checkers: each algebraic step is checked, printed, and a failure exits 1.

Not a checker itself (the test suite runs only ``check_*.py``).
"""

from __future__ import annotations

import sympy as sp

_failed: list[str] = []


def is_zero(expr: sp.Expr) -> bool:
    """True when ``expr`` simplifies to exactly 0 (tries a few normal forms, since ``simplify`` alone can stall)."""
    expr = sp.sympify(expr)
    # Cheap normal forms first; simplify() is the slow last resort.
    for f in (sp.cancel, sp.simplify, lambda e: sp.simplify(sp.powsimp(sp.expand(e)))):
        try:
            if f(expr) == 0:
                return True
        except (TypeError, ValueError, NotImplementedError):  # a normal form that does not apply is no evidence
            continue
    return False


def equal(name: str, lhs: sp.Expr, rhs: sp.Expr) -> None:
    """Check the step ``lhs == rhs`` as ``simplify(lhs - rhs) == 0`` (entrywise for matrices)."""
    diff = sp.sympify(lhs) - sp.sympify(rhs)
    ok = all(is_zero(d) for d in diff) if isinstance(diff, sp.MatrixBase) else is_zero(diff)
    _report(name, ok)


def holds(name: str, cond: bool | sp.Basic) -> None:
    """Check a step that is a plain truth value (an inequality on exact numbers, a sympy relation, ...)."""
    ok = bool(cond == sp.true) if isinstance(cond, sp.Basic) else bool(cond)
    _report(name, ok)


def _report(name: str, ok: bool) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}", flush=True)
    if not ok:
        _failed.append(name)


def finish() -> None:
    """Exit non-zero when any step failed, so a subprocess caller sees it."""
    if _failed:
        print(f"{len(_failed)} step(s) FAILED: {_failed}")
        raise SystemExit(1)
    print("all steps checked")
