"""ODE backends behind one entry point: :class:`Solver` holds the settings of a solve,
validated once when it is made, and :meth:`Solver.solve` runs it.

The own Runge-Kutta of :mod:`pyro_cnf.ode.rk` (dopri5, rk4, midpoint, euler) runs every
solve it can: no adjoint, no option it does not know. Everything else goes to
:mod:`pyro_cnf.ode.torchdiffeq` (imported only then), with the options passed through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import rk
from .rk import DEFAULT_MAX_STEPS, DEFAULT_TOL, SolverError

__all__ = [
    "Solver", "SolverError", "ADAPTIVE_METHODS", "FIXED_METHODS", "DEFAULT_MAX_STEPS", "DEFAULT_TOL", "DEFAULT_TRAIN_TOL"
]

ADAPTIVE_METHODS = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"})
FIXED_METHODS = frozenset(
    {"euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams"}
)
#: ``rtol`` and ``atol`` of a solve differentiated for training when no tolerance at all is
#: given. A training loss averages over a batch and many steps, so it needs far less accuracy
#: than an evaluated log-density, and a looser solve takes fewer steps (BENCHMARKS.md,
#: "Training tolerance").
DEFAULT_TRAIN_TOL = 1e-3
#: Options the own solver understands; any other sends the solve to torchdiffeq.
OWN_OPTIONS = frozenset({"first_step", "max_num_steps", "safety", "ifactor", "dfactor"})
BACKENDS = ("auto", "torchdiffeq")


#: The step-size options: (name, open lower bound, open upper bound, what that means).
_STEP_CONTROLS = (
    ("safety", 0.0, math.inf, "a finite number > 0"),
    ("ifactor", 1.0, math.inf, "a finite number > 1 (the largest growth of a step)"),
    ("dfactor", 0.0, 1.0, "a number in (0, 1) (the largest shrinkage of a step)"),
    ("first_step", 0.0, math.inf, "a finite number > 0"),
)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass(frozen=True)
class Solver:
    """The settings of an ODE solve; invalid ones raise ``ValueError`` or ``TypeError``
    here, at construction, never in the middle of a solve.

    Arguments:
        method: An adaptive method (dopri5, dopri8, bosh3, fehlberg2, adaptive_heun) or a
            fixed-grid one (euler, midpoint, rk4, heun2, heun3, explicit_adams,
            implicit_adams, fixed_adams; these need ``steps`` or ``options["step_size"]``).
        rtol, atol: Tolerances of adaptive methods, finite and >= 0, not both 0;
            :data:`DEFAULT_TOL` when not given.
        train_rtol, train_atol: The tolerances of a solve that is differentiated for
            training (:meth:`tolerances`). Not given, they are ``rtol`` and ``atol`` when
            either of those is given (a tolerance the user passes applies to every solve),
            and the looser :data:`DEFAULT_TRAIN_TOL` when no tolerance is given at all.
        steps: Equal steps over the interval for a fixed-grid method; with the own dopri5,
            ``steps`` fixed fifth-order steps (``6 steps + 1`` evaluations).
        adjoint: Differentiate by ``odeint_adjoint`` (memory flat in the number of steps).
        options: Solver options (torchdiffeq's names); the own solver knows
            :data:`OWN_OPTIONS`, any other option selects torchdiffeq.
        adjoint_options: torchdiffeq's options for the adjoint solve, merged into the defaults
            (seminorm, and for an adaptive backward solve the forward's ``max_num_steps``).
        backend: ``"auto"`` (the own solver where it applies) or ``"torchdiffeq"``.

    Example:
        >>> Solver("rk4", steps=4).own, Solver(adjoint=True).own
        (True, False)
        >>> Solver(rtol=-1e-5)
        Traceback (most recent call last):
        ...
        ValueError: rtol must be a finite number >= 0 or None, got -1e-05
    """

    method: str = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    train_rtol: float | None = None
    train_atol: float | None = None
    steps: int | None = None
    adjoint: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    adjoint_options: Mapping[str, Any] | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in ADAPTIVE_METHODS | FIXED_METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; expected one of {sorted(ADAPTIVE_METHODS | FIXED_METHODS)}"
            )
        for name in ("rtol", "atol", "train_rtol", "train_atol"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        for training, names in ((False, "rtol and atol"), (True, "train_rtol and train_atol")):
            if self.tolerances(training) == (0, 0):
                raise ValueError(f"{names} are both 0: no step would ever be accepted")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.adjoint, bool):
            raise TypeError(f"adjoint must be True or False, got {self.adjoint!r}")
        for name in ("options", "adjoint_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
        # copies, so that the caller's dicts can change without changing a validated solver
        object.__setattr__(self, "options", dict(self.options))
        adjoint_options = {"norm": "seminorm", **(self.adjoint_options or {})}  # merged: a user's option adds
        object.__setattr__(self, "adjoint_options", adjoint_options)
        if self.steps is not None and not _positive_int(self.steps):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.adaptive and self.steps is not None and not (self.method in rk.METHODS and self.own):
            raise ValueError(
                f"steps=N with the adaptive {self.method!r} asks for N fixed steps, which only "
                "pyro_cnf's own dopri5 takes (backend='auto', adjoint=False, no torchdiffeq-only "
                "options); pass steps=None for adaptive steps or a fixed-grid method"
            )
        if not self.adaptive and self.steps is None and not {"step_size", "grid_constructor"} & set(self.options):
            # torchdiffeq would silently take one single step over the whole interval.
            raise ValueError(
                f"method {self.method!r} is a fixed-grid solver: pass steps=N (N equal steps "
                "over [0, T]) or options={'step_size': h}"
            )
        budget = self.options.get("max_num_steps", DEFAULT_MAX_STEPS)
        if not _positive_int(budget):
            raise ValueError(f"options['max_num_steps'] must be a positive integer, got {budget!r}")
        # step-size controls that cannot work would fail only mid-solve ("underflow in dt")
        for name, low, high, what in _STEP_CONTROLS:
            value = self.options.get(name)
            if value is not None and not (_number(value) and low < value < high):
                raise ValueError(f"options[{name!r}] must be {what}, got {value!r}")

    @property
    def adaptive(self) -> bool:
        """Whether the method controls its step size (``steps`` aside)."""
        return self.method in ADAPTIVE_METHODS

    @property
    def own(self) -> bool:
        """Whether a solve runs on :mod:`pyro_cnf.ode.rk` rather than torchdiffeq."""
        return (
            self.backend == "auto"
            and not self.adjoint
            and self.method in rk.METHODS
            and set(self.options) <= OWN_OPTIONS
        )

    def tolerances(self, training: bool = False) -> tuple[float, float]:
        """``(rtol, atol)`` of a solve; ``training``: one differentiated for training.

        Example:
            >>> Solver().tolerances(), Solver().tolerances(training=True)
            ((1e-05, 1e-05), (0.001, 0.001))
            >>> Solver(rtol=1e-8, atol=1e-8).tolerances(training=True)  # given: every solve
            (1e-08, 1e-08)
            >>> Solver(rtol=1e-6, train_rtol=1e-4).tolerances(training=True)
            (0.0001, 1e-05)
        """
        rtol = DEFAULT_TOL if self.rtol is None else self.rtol
        atol = DEFAULT_TOL if self.atol is None else self.atol
        if not training:
            return rtol, atol
        if self.rtol is None and self.atol is None:
            rtol = atol = DEFAULT_TRAIN_TOL
        return (rtol if self.train_rtol is None else self.train_rtol,
                atol if self.train_atol is None else self.train_atol)

    @property
    def max_num_steps(self) -> int:
        return self.options.get("max_num_steps", DEFAULT_MAX_STEPS)

    def solve(
        self,
        func: Callable[[Tensor, Tensor], Tensor],
        y0: Tensor,
        t0: float,
        t1: float,
        norm: Callable[[Tensor], Tensor],
        adjoint_params: Sequence[Tensor] = (),
        describe_backward: Callable[[str], SolverError] | None = None,
        training: bool = False,
    ) -> Tensor:
        """The state at ``t1`` of ``dy/dt = func(t, y)``, ``y(t0) = y0``, shaped like
        ``y0``. ``norm`` measures scaled local errors; the adjoint differentiates
        ``adjoint_params`` and reports a failed backward solve as
        ``describe_backward(reason)``; ``training`` selects :meth:`tolerances`. Raises
        :class:`SolverError` when the solver gives up."""
        rtol, atol = self.tolerances(training)
        if not self.own:
            from . import torchdiffeq

            return torchdiffeq.solve(self, func, y0, t0, t1, norm, adjoint_params, describe_backward, rtol=rtol, atol=atol)
        if self.steps is not None or not self.adaptive:
            return rk.integrate_fixed(func, y0, t0, t1, method=self.method, steps=self.steps)
        options = {"max_num_steps": self.max_num_steps, **self.options}
        return rk.integrate_adaptive(func, y0, t0, t1, method=self.method, rtol=rtol, atol=atol, norm=norm, **options)
