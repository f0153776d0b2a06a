r"""Explicit Runge-Kutta on one flat state: the fast path of :class:`~pyro_cnf.ContinuousFlow`.

A CNF solve integrates one tensor of shape ``(N, k)`` from ``t0`` to ``t1`` and needs
only the end point. This module does exactly that, with the step size kept as a Python
float and the stages combined by in-place ``add_``: no dense-output fit, no stage
tensor indexed along its last axis, no tuple packing, so the cost of a step is the
``s`` evaluations of ``func`` plus about ``s^2 / 2`` vector updates. torchdiffeq spends
up to half of a CNF solve on that bookkeeping at ``d = 64`` (``benchmarks/profile_w1.py``).

Methods: ``dopri5`` (adaptive, Dormand & Prince 1980, error control as in Hairer,
Norsett & Wanner, *Solving ODEs I*, II.4; or on a fixed grid of fifth-order steps), and
the fixed grids ``euler``, ``midpoint`` and ``rk4`` (the 3/8 rule, as torchdiffeq's ``rk4``). The same tableaus, tolerances and
norm as torchdiffeq give the same solution up to its own step-size sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction as Fr

import torch
from torch import Tensor

__all__ = ["SolverError", "METHODS", "integrate"]


class SolverError(RuntimeError):
    """The ODE solver gave up (step size underflow, step budget, or non-finite state)."""


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau: ``c`` nodes, ``a`` rows of stage weights, ``b`` solution weights,
    ``e`` error weights (``b`` minus the embedded lower-order solution), ``order`` of the
    embedded pair's lower member plus one (the exponent of step-size control)."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...] = ()
    order: int = 0

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated at the new solution."""
        return bool(self.a) and self.a[-1] == self.b[:-1] and self.b[-1] == 0 and self.c[-1] == 1


def _floats(*rows) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in rows)


_DOPRI5_B = (Fr(35, 384), 0, Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84), 0)
_DOPRI5_B4 = (Fr(5179, 57600), 0, Fr(7571, 16695), Fr(393, 640), Fr(-92097, 339200), Fr(187, 2100), Fr(1, 40))

METHODS: dict[str, Tableau] = {
    "euler": Tableau(c=(0.0,), a=(), b=(1.0,)),
    "midpoint": Tableau(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0)),
    "rk4": Tableau(
        c=(0.0, 1 / 3, 2 / 3, 1.0),
        a=_floats((Fr(1, 3),), (Fr(-1, 3), 1), (1, -1, 1)),
        b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    ),
    "dopri5": Tableau(
        c=tuple(float(v) for v in (0, Fr(1, 5), Fr(3, 10), Fr(4, 5), Fr(8, 9), 1, 1)),
        a=_floats(
            (Fr(1, 5),),
            (Fr(3, 40), Fr(9, 40)),
            (Fr(44, 45), Fr(-56, 15), Fr(32, 9)),
            (Fr(19372, 6561), Fr(-25360, 2187), Fr(64448, 6561), Fr(-212, 729)),
            (Fr(9017, 3168), Fr(-355, 33), Fr(46732, 5247), Fr(49, 176), Fr(-5103, 18656)),
            _DOPRI5_B[:-1],
        ),
        b=tuple(float(v) for v in _DOPRI5_B),
        e=tuple(float(b - b4) for b, b4 in zip(_DOPRI5_B, _DOPRI5_B4)),
        order=5,
    ),
}


#: An adaptive step that would end within this factor of the end time is stretched to it.
STRETCH = 1.1


def _combine(y: Tensor | None, h: float, weights: tuple[float, ...], k: list[Tensor]) -> Tensor:
    """``y + h * sum_j weights[j] * k[j]`` (``y=None``: the sum alone), skipping zero weights."""
    out = None
    for w, kj in zip(weights, k):
        if w == 0.0:
            continue
        if out is None:
            out = kj.mul(h * w) if y is None else y.add(kj, alpha=h * w)
        else:
            out.add_(kj, alpha=h * w)
    return y if out is None else out


def _step(func: Callable, tab: Tableau, t: float, y: Tensor, h: float, k0: Tensor) -> tuple[Tensor, list[Tensor]]:
    """One explicit RK step from ``(t, y)`` with ``k0 = func(t, y)``: ``(y_new, stages)``."""
    k = [k0]
    for c, row in zip(tab.c[1:], tab.a):
        k.append(func(y.new_full((), t + c * h), _combine(y, h, row, k)))
    if tab.fsal:
        return _combine(y, h, tab.a[-1], k[:-1]), k
    return _combine(y, h, tab.b, k), k


def integrate(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t0: float,
    t1: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    norm: Callable[[Tensor], Tensor] | None = None,
    steps: int | None = None,
    first_step: float | None = None,
    max_num_steps: int = 1000,
    safety: float = 0.9,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
) -> Tensor:
    """The solution at ``t1`` of ``dy/dt = func(t, y)``, ``y(t0) = y0``.

    Arguments:
        func: ``func(t, y)`` with ``t`` a 0-d tensor of ``y``'s dtype and device; returns
            a tensor shaped like ``y``.
        y0: Initial state, any shape.
        t0, t1: Start and end times; ``t1 < t0`` integrates backwards.
        method: A key of :data:`METHODS`.
        rtol, atol, norm: Adaptive methods accept a step when
            ``norm(error / (atol + rtol * max(|y|, |y_new|))) <= 1``; ``norm`` defaults to
            the RMS over all entries.
        steps: Number of equal steps: required by the fixed-grid methods; with ``dopri5``
            it gives ``steps`` fixed fifth-order steps, ``6 steps + 1`` evaluations.
        first_step: Initial step of adaptive methods, default ``|t1 - t0| / 10``.
        max_num_steps: Budget of accepted plus rejected adaptive steps.
        safety, ifactor, dfactor: Step-size control: the next step is the current one
            times ``safety * ratio^(-1/order)``, clipped to ``[dfactor, ifactor]`` (never
            below 1 after an accepted step).

    Raises:
        SolverError: step size underflow or ``max_num_steps`` exceeded.

    Example:
        >>> y = integrate(lambda t, y: -y, torch.ones(3, dtype=torch.float64), 0.0, 1.0, rtol=1e-10, atol=1e-10)
        >>> torch.allclose(y, torch.full((3,), torch.e ** -1, dtype=torch.float64))
        True
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    tab = METHODS[method]
    span = t1 - t0
    if steps is not None or not tab.e:
        if steps is None or steps < 1:
            raise ValueError(f"{method!r} is a fixed-grid method: pass steps >= 1, got {steps!r}")
        y, h, k0 = y0, span / steps, None
        for i in range(steps):
            t = t0 + i * h
            if k0 is None:
                k0 = func(y.new_full((), t), y)
            y, k = _step(func, tab, t, y, h, k0)
            k0 = k[-1] if tab.fsal else None
        return y

    norm = norm or (lambda r: r.pow(2).mean().sqrt())
    direction = 1.0 if span > 0 else -1.0
    h = direction * abs(first_step if first_step is not None else abs(span) / 10)
    exponent = -1.0 / tab.order
    tiny = torch.finfo(y0.dtype).eps * max(abs(t0), abs(t1))
    t, y = t0, y0
    k0 = func(y.new_full((), t), y)
    rejected = False
    for _ in range(max_num_steps):
        if direction * (t1 - t) <= 0:
            return y
        if direction * (t + STRETCH * h - t1) > 0:
            # Land on t1: no interpolation, no overshoot, and no sliver of a last step that
            # costs a whole step; the step targets an error ratio of safety^order (~0.6),
            # so a step up to STRETCH longer is still accepted.
            h = t1 - t
        if abs(h) <= tiny:
            raise SolverError(f"underflow in dt {h:.3g}")
        y_new, k = _step(func, tab, t, y, h, k0)
        with torch.no_grad():  # step-size control is not differentiated
            scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
            ratio = float(norm(_combine(None, h, tab.e, k).div_(scale)))
        if ratio <= 1.0:  # accepted; NaN compares False and shrinks the step
            t = t1 if abs(t1 - (t + h)) <= 1e-12 * abs(span) else t + h
            y = y_new
            k0 = k[-1] if tab.fsal else func(y.new_full((), t), y)
            factor = ifactor if ratio == 0.0 else min(ifactor, max(1.0, safety * ratio**exponent))
            if rejected:  # no growth right after a rejection (Hairer's DOPRI5)
                factor = 1.0
            rejected = False
        else:
            factor = dfactor if ratio != ratio else min(1.0, max(dfactor, safety * ratio**exponent))
            rejected = True
        h *= factor
    if direction * (t1 - t) <= 0:
        return y
    raise SolverError(f"max_num_steps exceeded ({max_num_steps}>={max_num_steps})")
