r"""Explicit Runge-Kutta on one flat state: the fast path of :class:`~pyro_cnf.ContinuousFlow`.

A CNF solve integrates one tensor from ``t0`` to ``t1`` and needs only the end point. This
module does exactly that, with the step size kept as a Python float and the stages
combined by in-place ``add_``: no dense-output fit, no stage tensor indexed along its last
axis, no tuple packing, so the cost of a step is the ``s`` evaluations of ``func`` plus
about ``s^2 / 2`` vector updates. torchdiffeq spends up to half of a CNF solve on that
bookkeeping at ``d = 64`` (``benchmarks/profile_w1.py``).

Two entry points: :func:`integrate_fixed` (``steps`` equal steps of any tableau) and
:func:`integrate_adaptive` (``dopri5`` with error control); :func:`integrate` picks one.

Methods: ``dopri5`` (Dormand & Prince 1980, with the embedded fourth-order solution of
Hairer, Norsett & Wanner, *Solving ODEs I*, II.4 and II.5, whose error weights are 1.5 times
torchdiffeq's: at equal tolerances this solver is stricter, its steps about
``1.5^(1/5)``, 8%, shorter), and the fixed grids ``euler``, ``midpoint`` and ``rk4`` (the 3/8
rule, as torchdiffeq's ``rk4``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction as Fr

import torch
from torch import Tensor

__all__ = ["SolverError", "METHODS", "integrate", "integrate_fixed", "integrate_adaptive", "initial_step"]

Func = Callable[[Tensor, Tensor], Tensor]
Norm = Callable[[Tensor], Tensor]


#: ``rtol`` and ``atol`` of an adaptive solve when none is given.
DEFAULT_TOL = 1e-5
#: Default cap on accepted + rejected adaptive steps; a healthy flow needs tens.
DEFAULT_MAX_STEPS = 1000


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


def _step(func: Func, tab: Tableau, t: float, y: Tensor, h: float, k0: Tensor,
          known: list[Tensor] = ()) -> tuple[Tensor, list[Tensor]]:
    """One explicit RK step from ``(t, y)`` with ``k0 = func(t, y)``: ``(y_new, stages)``;
    ``known`` are the first stages after ``k0`` if already evaluated at this ``h``.

    With a FSAL tableau the last stage is evaluated at ``y_new`` itself, so ``y_new`` is
    that stage's input, not a second sum over the stages."""
    k = [k0, *known]
    y_stage = y
    for c, row in zip(tab.c[len(k):], tab.a[len(k) - 1 :]):
        y_stage = _combine(y, h, row, k)
        k.append(func(y.new_full((), t + c * h), y_stage))
    return (y_stage if tab.fsal else _combine(y, h, tab.b, k)), k


def _method(method: str) -> Tableau:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    return METHODS[method]


def integrate_fixed(func: Func, y0: Tensor, t0: float, t1: float, *, method: str, steps: int) -> Tensor:
    """The solution at ``t1`` after ``steps`` equal steps of ``method`` (any tableau of
    :data:`METHODS`; ``dopri5`` gives fifth-order steps at ``6 steps + 1`` evaluations).

    Example:
        >>> y = integrate_fixed(lambda t, y: -y, torch.ones(2, dtype=torch.float64), 0.0, 1.0, method="rk4", steps=8)
        >>> round(float(y[0]), 5)  # exp(-1) = 0.367879...
        0.36788
    """
    tab = _method(method)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{method!r} on a fixed grid: pass steps >= 1, got {steps!r}")
    y, h, k0 = y0, (t1 - t0) / steps, None
    for i in range(steps):
        t = t0 + i * h
        if k0 is None:
            k0 = func(y.new_full((), t), y)
        y, k = _step(func, tab, t, y, h, k0)
        k0 = k[-1] if tab.fsal else None
    return y


def _rms(r: Tensor) -> Tensor:
    return r.pow(2).mean().sqrt()


def initial_step(d1: float, rate: float, span: float, *, order: int, growth: float = 1e3) -> float:
    r"""The first trial step, signed like ``span``: the whole interval if one step can cover
    it, else a tenth of it.

    ``d1`` is the norm of ``f(t0, y0)`` in units of the tolerances and ``rate`` the relative
    change of ``f`` per unit time, :math:`\lambda`. Like Hairer, Norsett & Wanner's starting
    step (*Solving ODEs I*, II.4), the local error of a step :math:`h` is estimated from ``f``
    and its first derivative alone, here with the derivatives modelled as growing
    geometrically, :math:`\|y^{(k)}\| pprox \|f\| \lambda^{k-1}`: a step of order
    :math:`p + 1 =` ``order`` errs by about :math:`h^{p+1} d_1 \lambda^p`, and the whole
    interval is tried when that is at most ``growth`` (so every new field, smooth and
    nearly constant in time, takes one step, as zuko's solver does). Otherwise the estimate
    is too rough to aim a step with (off by up to 2x either way on trained fields, and a
    step too long costs a rejected step), and ``|span| / 10`` starts the controller.
    ``benchmarks/initial_step.py`` measures both choices.

    Example:
        >>> initial_step(0.0, 0.0, 1.0, order=5)  # a zero field: any step is exact
        1.0
        >>> initial_step(3e5, 4.0, -1.0, order=5)  # a trained field, backwards in time
        -0.1
    """
    if d1 * abs(span) ** order * rate ** (order - 1) <= growth:
        return span
    return span / 10


def integrate_adaptive(
    func: Func,
    y0: Tensor,
    t0: float,
    t1: float,
    *,
    method: str = "dopri5",
    rtol: float = DEFAULT_TOL,
    atol: float = DEFAULT_TOL,
    norm: Norm | None = None,
    first_step: float | None = None,
    max_num_steps: int = DEFAULT_MAX_STEPS,
    safety: float = 0.9,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
) -> Tensor:
    """The solution at ``t1`` of ``dy/dt = func(t, y)``, ``y(t0) = y0``, with error control.

    A step from ``y`` to ``y_new`` is accepted when
    ``norm(error / (atol + rtol * max(|y|, |y_new|))) <= 1``. The first trial step is
    ``first_step``, or :func:`initial_step`'s choice from one probe evaluation that is
    also the second stage of a step over the whole interval (so a field that one step
    integrates costs one step: 7 evaluations with dopri5); the next is the current one times
    ``safety * ratio^(-1/order)``, clipped to ``[dfactor, ifactor]`` (never below 1 after an
    accepted step, never above 1 right after a rejection). The last step lands on ``t1``.

    Raises:
        SolverError: the field is NaN or inf at an accepted state, the step size underflows,
            or ``max_num_steps`` accepted plus rejected steps do not reach ``t1``.

    Example:
        >>> y = integrate_adaptive(lambda t, y: -y, torch.ones(3, dtype=torch.float64), 0.0, 1.0, rtol=1e-10, atol=1e-10)
        >>> torch.allclose(y, torch.full((3,), torch.e ** -1, dtype=torch.float64))
        True
    """
    tab = _method(method)
    if not tab.e:
        raise ValueError(f"{method!r} has no error estimate: use integrate_fixed with steps=N")
    norm = norm or _rms
    span = t1 - t0
    tiny = torch.finfo(y0.dtype).eps * max(abs(t0), abs(t1))
    exponent = -1.0 / tab.order
    t, y = t0, y0
    k0 = func(y.new_full((), t), y)
    known: list[Tensor] = []
    if first_step is not None:
        h = math.copysign(abs(first_step), span)
    else:
        # The second stage of a step over the whole interval, an Euler step of c1 * span,
        # doubles as the probe of how fast f changes: if that step is the one to take,
        # the probe is not wasted.
        probe = tab.c[1] * span
        k1 = func(y.new_full((), t + probe), y.add(k0, alpha=probe))
        with torch.no_grad():
            scale = y.abs().mul_(rtol).add_(atol)
            d1 = float(norm(k0 / scale))
            rate = float(norm((k1 - k0).div_(scale))) / abs(probe) / d1 if d1 > 0 else 0.0
        h = initial_step(d1, rate, span, order=tab.order)
        if h == span:
            known = [k1]  # the probe is this step's second stage
    rejected = nonfinite = False
    for _ in range(max_num_steps):
        if (t1 - t) * span <= 0:
            return y
        if (t + STRETCH * h - t1) * span > 0:
            # Land on t1: no interpolation, no overshoot, and no sliver of a last step that
            # costs a whole step; the step targets an error ratio of safety^order (~0.6),
            # so a step up to STRETCH longer is still accepted.
            h = t1 - t
        if abs(h) <= tiny:
            raise SolverError(f"underflow in dt {h:.3g}" + (", the last trial step overflowed to NaN or inf" if nonfinite else ""))
        y_new, k = _step(func, tab, t, y, h, k0, known)
        known = []
        with torch.no_grad():  # step-size control is not differentiated
            scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
            ratio = float(norm(_combine(None, h, tab.e, k).div_(scale)))
        nonfinite = not math.isfinite(ratio)
        if ratio <= 1.0:  # accepted
            t = t1 if abs(t1 - (t + h)) <= 1e-12 * abs(span) else t + h
            y = y_new
            k0 = k[-1] if tab.fsal else func(y.new_full((), t), y)
            factor = ifactor if ratio == 0.0 else min(ifactor, max(1.0, safety * ratio**exponent))
            if rejected:  # no growth right after a rejection (Hairer's DOPRI5)
                factor = 1.0
            rejected = False
        else:
            if nonfinite and not bool(torch.isfinite(k0).all()):
                # Shrinking cannot help a field that is already NaN at an accepted state.
                raise SolverError(f"the vector field returned NaN or inf at t={t:.4g}")
            factor = dfactor if nonfinite else min(1.0, max(dfactor, safety * ratio**exponent))
            rejected = True
        h *= factor
    if (t1 - t) * span <= 0:
        return y
    raise SolverError(f"max_num_steps exceeded ({max_num_steps}>={max_num_steps})")


def integrate(func: Func, y0: Tensor, t0: float, t1: float, *, method: str = "dopri5",
              steps: int | None = None, **adaptive) -> Tensor:
    """:func:`integrate_fixed` when ``steps`` is given or the method has no error
    estimate, else :func:`integrate_adaptive` with the keyword arguments ``adaptive``.

    Example:
        >>> y = integrate(lambda t, y: -y, torch.ones(3, dtype=torch.float64), 0.0, 1.0, rtol=1e-10, atol=1e-10)
        >>> torch.allclose(y, torch.full((3,), torch.e ** -1, dtype=torch.float64))
        True
    """
    if steps is not None or not _method(method).e:
        if adaptive:
            raise ValueError(f"a fixed grid takes no adaptive options, got {sorted(adaptive)}")
        return integrate_fixed(func, y0, t0, t1, method=method, steps=steps)
    return integrate_adaptive(func, y0, t0, t1, method=method, **adaptive)
