r"""The simulator's sampler in a second process, one draw ahead: the same draws, on the machine's other core.

A block update of :func:`misa_theory.simulate.simulate` is a chain

    draw B_k → gradient on B_k → observe(B_k, ‖g_b‖²) → draw B_{k+1} → …

in which the Adam update, the step and the recorded ‖∇f(θ_{k+1})‖² of block update k do not feed the sampler,
and the sampler's targets and draw for k+1 do not feed them.  With the many-seeded, small problems the
simulator is built for, both halves are dozens of small numpy calls, so running them in two processes
shortens a block update to the longer half plus the part that is truly serial (the gradient on B_k).

:class:`SamplerProcess` holds a :class:`~misa_theory.sampler.ModuleSampler` (``streams=S``) in a child
process.  The child draws B_k, publishes it, waits for the observation of block update k, folds it in and
draws B_{k+1} while the parent is still stepping.  Nothing but the draws and the observations crosses: the
child's sampler is built from the same arguments and sees the same observations in the same order as an
in-process one, so every draw, and so every trajectory, is bit-identical (a test checks this).

Hand-off: a shared buffer holds the mask (S, M), the observations (S, M), seed 0's target π (M,) and four
counters.  A side writes its data, then the counter that announces it; the other spins on the counter (a
wake-up through the kernel would cost more than a whole draw).  That order is what the reader sees on x86-64,
whose stores are not reordered with other stores nor loads with other loads, so :func:`available` offers the
process only there.  A spinning side checks that the other is alive every 2¹⁶ turns and backs off to 1 ms
sleeps after about a second, so a stopped or killed partner neither hangs the parent nor leaves a busy child.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from .sampler import ModuleSampler

__all__ = ["SamplerProcess", "available"]

_DRAWN, _OBSERVED, _FAILED, _SKIP = range(4)  # counters: draws published, observations published, error, no-obs
_ERR_BYTES = 2048
_CHECK = 0xFFFF  # spins between liveness checks
_PATIENT_CHECKS = 64  # liveness checks (~1 s of spinning) before the waiter sleeps between checks


def available() -> bool:
    """True where the spin hand-off's store order holds (x86-64) and a second core exists to run the child."""
    return platform.machine().lower() in ("x86_64", "amd64") and (os.cpu_count() or 1) >= 2


def _views(raw: Any, S: int, M: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    buf = np.frombuffer(raw, dtype=np.uint8)
    ctl = buf[:32].view(np.int64)
    obs = buf[32:32 + 8 * S * M].view(np.float64).reshape(S, M)
    target = buf[32 + 8 * S * M:32 + 8 * (S * M + M)].view(np.float64)
    at = 32 + 8 * (S * M + M)
    mask = buf[at:at + S * M].view(bool).reshape(S, M)
    err = buf[at + S * M:at + S * M + _ERR_BYTES]
    return ctl, obs, target, mask, err


def _nbytes(S: int, M: int) -> int:
    return 32 + 8 * (S * M + M) + S * M + _ERR_BYTES


def _wait(ctl: np.ndarray, slot: int, value: int, partner_alive: Any, fail_check: bool) -> None:
    """Spin until ctl[slot] ≥ value; raise if the partner died (or, for the parent, reported an error)."""
    turns = checks = 0
    while ctl[slot] < value:
        if fail_check and ctl[_FAILED]:
            return
        turns += 1
        if turns & _CHECK == 0:
            if not partner_alive():
                raise RuntimeError("the sampler's partner process is gone")
            checks += 1
            if checks > _PATIENT_CHECKS:
                time.sleep(1e-3)


def _child(raw: Any, kwargs: dict[str, Any], S: int, M: int, K: int, record: bool, parent: int) -> None:
    """The child's loop: draw, publish, wait for the observation, fold it in; K times."""
    ctl, obs, target, mask, err = _views(raw, S, M)
    try:
        sampler = ModuleSampler(**kwargs)

        def parent_alive() -> bool:
            return os.getppid() == parent

        for k in range(K):
            if record:
                target[:] = sampler.target_inclusion()[0]
            drawn = sampler.draw()
            mask[...] = drawn
            ctl[_DRAWN] = k + 1
            if k + 1 < K:
                sampler.prefetch()  # the next draw's random input, while the parent computes the gradient
            _wait(ctl, _OBSERVED, k + 1, parent_alive, False)
            if ctl[_SKIP] != k + 1:
                sampler.observe(drawn, obs)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent, which re-raises it
        msg = f"{type(exc).__name__}: {exc}".encode()[:_ERR_BYTES - 1]
        err[:len(msg)] = np.frombuffer(msg, dtype=np.uint8)
        err[len(msg)] = 0
        ctl[_FAILED] = 1


class SamplerProcess:
    """``ModuleSampler(**kwargs)`` (with ``streams=S``) run for exactly K draws in a child process.

    Use as a context manager.  Call :meth:`draw` then :meth:`observe` (or :meth:`skip`) once per block
    update, in that order; the arguments are validated here, in the parent, by building the sampler once.

    Args:
        kwargs: ModuleSampler's keyword arguments (``sizes``, ``groups``, ``delta``, …, ``streams``).
        K: number of draws.
        record: also hand over seed 0's target π of each draw (:attr:`target`).
    """

    def __init__(self, kwargs: dict[str, Any], K: int, record: bool = False) -> None:
        probe = ModuleSampler(**kwargs)  # raises on bad arguments before a process starts
        self.budget = probe.budget
        S, M = probe._n_streams, probe.n_modules
        self._K, self._k = K, 0
        # fork (multiprocessing's Linux default before Python 3.14): no re-import of the caller's __main__,
        # which spawn needs guarded, and a start of ≈ 20 ms; the child runs only this module's numpy code
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._raw = ctx.RawArray(ctypes.c_uint8, _nbytes(S, M))
        self._ctl, self._obs, self.target, self._mask, self._err = _views(self._raw, S, M)
        self._proc = ctx.Process(target=_child, args=(self._raw, dict(kwargs), S, M, K, record, os.getpid()),
                                 daemon=True, name="misa-sampler")
        self._proc.start()

    def __enter__(self) -> SamplerProcess:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(check=exc_type is None)

    @property
    def obs(self) -> np.ndarray:
        """The shared (S, M) buffer of squared norms; fill it where the last mask is set, then :meth:`observe`."""
        return self._obs

    def _raise_if_failed(self) -> None:
        if self._ctl[_FAILED]:
            msg = bytes(self._err[:np.flatnonzero(self._err == 0)[0]]).decode(errors="replace")
            self.close(check=False)
            if msg.startswith("ValueError: "):  # the sampler's own input checks keep their type
                raise ValueError(msg[len("ValueError: "):])
            raise RuntimeError(f"sampler process failed: {msg}")

    def draw(self) -> np.ndarray:
        """The next active set, a boolean mask (S, M) (a copy: the buffer is reused for the next draw)."""
        if self._k >= self._K:
            raise RuntimeError(f"this SamplerProcess was made for {self._K} draws")
        self._k += 1
        _wait(self._ctl, _DRAWN, self._k, self._proc.is_alive, True)
        self._raise_if_failed()
        return self._mask.copy()

    def observe(self) -> None:
        """Publish :attr:`obs` as this block update's observation."""
        self._ctl[_OBSERVED] = self._k

    def skip(self) -> None:
        """This block update observed nothing (an empty active set)."""
        self._ctl[_SKIP] = self._k
        self._ctl[_OBSERVED] = self._k

    def close(self, check: bool = True) -> None:
        """Reap the child: after all K observations, wait for it to fold in the last one and (``check``) raise
        a failure there; otherwise stop it."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if self._k == self._K and self._ctl[_OBSERVED] == self._K and not self._ctl[_FAILED]:
            proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
        proc.join()
        if check:
            self._raise_if_failed()
