r"""The continuous normalizing flow: one ODE solve for the map and its log-determinant.

Conventions: :math:`\mathrm{d}x/\mathrm{d}t = f(t, x[, c])`, data :math:`x_0` at
:math:`t = 0`, base sample :math:`x_T` at :math:`t = T`. The instantaneous change of
variables integrates with the state

.. math:: \frac{\mathrm{d}}{\mathrm{d}t} \ell = \mathrm{tr}\,\frac{\partial f}{\partial x}(t, x_t),
   \qquad \ell(0) = 0,

so that :math:`\ell(T) = \log|\det \partial x_T / \partial x_0|` and
:math:`\log p_\mathrm{data}(x_0) = \log p_\mathrm{base}(x_T) + \int_0^T \mathrm{tr}\,\partial f/\partial x \,\mathrm{d}t`.
Solving the same augmented system from :math:`T` down to :math:`0` yields
:math:`\log|\det \partial x_0/\partial x_T|`, the negative, with no sign to remember.

The pieces: :mod:`pyro_cnf.dynamics` (the augmented right-hand side), :mod:`pyro_cnf.trace`
(which estimator), :mod:`pyro_cnf.ode` (the solvers), :mod:`pyro_cnf.checks` (inputs).

References:
    | Neural Ordinary Differential Equations (Chen et al., 2018) https://arxiv.org/abs/1806.07366
    | FFJORD (Grathwohl et al., 2019) https://arxiv.org/abs/1810.01367
    | How to train your neural ODE (Finlay et al., 2020) https://arxiv.org/abs/2002.02798
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .checks import check_inputs
from .dynamics import ERROR_NORMS, Counter, Dynamics
from .nets import ODENet
from .ode import Solver, SolverError
from .trace import AUTO_EXACT_MAX_DIM, ESTIMATORS, NOISES, identity_basis, probe_noise, trace_mode

__all__ = [
    "AUTO_EXACT_MAX_DIM",
    "ContinuousFlow",
    "FlowStats",
    "SolverError",
    "default_flow",
    "resolve_flow",
    "standard_normal_log_prob",
]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over the last axis: shape ``z.shape[:-1]``.

    Example:
        >>> standard_normal_log_prob(torch.zeros(1, 2))  # -log(2 pi)
        tensor([-1.8379])
    """
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class FlowStats(NamedTuple):
    r"""What a solve measured besides the map, returned by ``flow(..., return_stats=True)``.

    Attributes:
        nfe: Function evaluations of the solve.
        kinetic_energy: RNODE's :math:`\int_0^T \|f\|^2 dt` per sample, shape batch
            (``None`` unless the flow has ``regularize=True``).
        jacobian_norm: RNODE's Jacobian Frobenius integral per sample, shape batch, or ``None``.
    """

    nfe: int
    kinetic_energy: Tensor | None = None
    jacobian_norm: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class _Estimation:
    """The flow's own settings (the solver's are in :class:`~pyro_cnf.ode.Solver`),
    validated when made."""

    T: float = 1.0
    trace: str = "auto"
    noise: str = "rademacher"
    error_norm: str = "mixed"
    regularize: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.T, bool) or not isinstance(self.T, (int, float)) or not (math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"T must be a finite number > 0, got {self.T!r}")
        object.__setattr__(self, "T", float(self.T))
        for name, allowed in (("trace", ESTIMATORS), ("noise", NOISES), ("error_norm", ERROR_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.regularize, bool):
            raise TypeError(f"regularize must be True or False, got {self.regularize!r}")


_ESTIMATION_FIELDS = frozenset(f.name for f in dataclasses.fields(_Estimation))
_SOLVER_FIELDS = frozenset(f.name for f in dataclasses.fields(Solver))


def _setting(holder: str, name: str) -> property:
    def get(self: ContinuousFlow) -> Any:
        return getattr(getattr(self, holder), name)

    def set(self: ContinuousFlow, value: Any) -> None:  # validated like the constructor's
        object.__setattr__(self, holder, dataclasses.replace(getattr(self, holder), **{name: value}))

    return property(get, set, doc=f"The ``{name}`` setting; assigning validates it.")


class ContinuousFlow(nn.Module):
    r"""A continuous normalizing flow: integrates ``(x, log|det|)`` between 0 and ``T``.

    ``flow(x)`` maps data (at ``t=0``) to base (at ``t=T``) and returns
    ``(y, log|det dy/dx|)``; ``flow(y, reverse=True)`` maps base to data and returns
    ``(x, log|det dx/dy|)``. Both come from one ODE solve. Every setting is validated
    here, and again when assigned later (``flow.rtol = 1e-6``); none is module state, so
    changing one never touches the ``state_dict``.

    Arguments:
        vector_field: A module ``f(t, x)`` or ``f(t, x, context)`` returning a tensor shaped
            like ``x``; ``divergence(t, x[, context]) -> (f, div)`` and
            ``jvp(t, x, v[, context]) -> (f, J v)`` are used when present (see
            :mod:`pyro_cnf.nets`), autograd otherwise.
        T: The end time.
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (see :func:`pyro_cnf.trace.trace_mode`:
            exact whenever the field has a closed form, the flow is in eval mode or gradients
            are off, or ``d <= AUTO_EXACT_MAX_DIM``; Hutchinson otherwise).
        noise: Hutchinson probes, ``"rademacher"`` or ``"gaussian"``, drawn once per solve.
        method, rtol, atol, train_rtol, train_atol, steps, adjoint, options, adjoint_options,
            backend: The ODE solver, see :class:`pyro_cnf.ode.Solver`. The default is
            adaptive ``dopri5`` at ``rtol = atol = 1e-5``, loosened to ``1e-3`` for a solve
            that is differentiated in training mode (``flow.train()`` with gradients on;
            ``flow.eval()`` or ``torch.no_grad()`` give the accurate solve). It runs on
            pyro_cnf's own Runge-Kutta; so do ``rk4``, ``midpoint``, ``euler`` and ``dopri5``
            on a grid of ``steps`` (fifth-order steps, ``6 steps + 1`` evaluations). The
            adjoint and every other method go to torchdiffeq.
        error_norm: ``"mixed"`` (torchdiffeq's RMS per state component, pooled over the
            batch) or ``"per_sample"`` (worst sample's RMS: a sample's log-density no
            longer depends on its batch-mates beyond the tolerance).
        regularize: Integrate RNODE's kinetic energy :math:`\|f\|^2` and Jacobian
            Frobenius norm, :math:`\|\epsilon^\top J\|^2` (or :math:`\|J \epsilon\|^2` when the field
            has a forward-mode ``jvp``; both unbiased), along the solve; ``forward(...,
            return_stats=True)`` returns them in a :class:`FlowStats`.

    Attributes:
        nfe: Function evaluations of the last forward solve.
        nfe_backward: Function evaluations of its backward pass (adjoint only; direct
            backpropagation evaluates nothing again).

    Example:
        >>> from pyro_cnf import ODENet
        >>> flow = ContinuousFlow(ODENet(2, (32, 32), zero_init=False))
        >>> x = torch.randn(10, 2)
        >>> z, ladj = flow(x)
        >>> x2, ladj2 = flow(z, reverse=True)
        >>> torch.allclose(x, x2, atol=1e-3), torch.allclose(ladj, -ladj2, atol=1e-3)
        (True, True)
    """

    def __init__(
        self,
        vector_field: nn.Module,
        *,
        T: float = 1.0,
        trace: str = "auto",
        noise: str = "rademacher",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        train_rtol: float | None = 1e-3,
        train_atol: float | None = 1e-3,
        steps: int | None = None,
        adjoint: bool = False,
        options: Mapping[str, Any] | None = None,
        adjoint_options: Mapping[str, Any] | None = None,
        error_norm: str = "mixed",
        regularize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not callable(vector_field):
            raise TypeError(f"vector_field must be a callable module, got {type(vector_field).__name__}")
        self.vector_field = vector_field
        self._estimation = _Estimation(T, trace, noise, error_norm, regularize)
        self.solver = Solver(
            method, rtol, atol, train_rtol, train_atol, steps, adjoint, options or {}, adjoint_options, backend
        )
        self._counter = Counter()
        self.nfe = 0

    T = _setting("_estimation", "T")
    trace = _setting("_estimation", "trace")
    noise = _setting("_estimation", "noise")
    error_norm = _setting("_estimation", "error_norm")
    regularize = _setting("_estimation", "regularize")
    method = _setting("solver", "method")
    rtol = _setting("solver", "rtol")
    atol = _setting("solver", "atol")
    train_rtol = _setting("solver", "train_rtol")
    train_atol = _setting("solver", "train_atol")
    steps = _setting("solver", "steps")
    adjoint = _setting("solver", "adjoint")
    options = _setting("solver", "options")
    adjoint_options = _setting("solver", "adjoint_options")
    backend = _setting("solver", "backend")

    def configure(self, **settings: Any) -> ContinuousFlow:
        """Change several settings at once, validated together (``flow.method = "rk4"``
        alone would be refused before ``steps`` is set); returns the flow.

        Example:
            >>> from pyro_cnf import ODENet
            >>> flow = ContinuousFlow(ODENet(2, (8,))).configure(method="rk4", steps=4)
            >>> flow.method, flow.steps
            ('rk4', 4)
        """
        own = {k: settings.pop(k) for k in list(settings) if k in _ESTIMATION_FIELDS}
        unknown = set(settings) - _SOLVER_FIELDS
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; expected some of {sorted(_ESTIMATION_FIELDS | _SOLVER_FIELDS)}")
        estimation, solver = dataclasses.replace(self._estimation, **own), dataclasses.replace(self.solver, **settings)
        object.__setattr__(self, "_estimation", estimation)
        object.__setattr__(self, "solver", solver)
        return self

    @property
    def input_dim(self) -> int | None:
        return getattr(self.vector_field, "input_dim", None)

    @property
    def context_dim(self) -> int | None:
        return getattr(self.vector_field, "context_dim", None)

    @property
    def nfe_backward(self) -> int:
        return self._counter.nfe - self.nfe

    def uses_own_solver(self) -> bool:
        """Whether a solve runs on :mod:`pyro_cnf.ode.rk` rather than torchdiffeq."""
        return self.solver.own

    def _fitting(self) -> bool:
        """Whether a solve now is differentiated for training (train mode, gradients on):
        it then takes the solver's training tolerances and, with ``trace="auto"``, may
        estimate the trace."""
        return self.training and torch.is_grad_enabled()

    def trace_mode(self, dim: int) -> str:
        """The estimator a solve in dimension ``dim`` uses now: closed, exact or hutchinson."""
        return trace_mode(self.trace, self.vector_field, dim, training=self._fitting())

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        reverse: bool = False,
        logdet: bool = True,
        return_stats: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, FlowStats]:
        """Integrate from 0 to ``T`` (or ``T`` to 0 when ``reverse``).

        Arguments:
            x: Input, shape ``(..., d)``; never modified.
            context: Shape ``(..., c)``, broadcast against the batch shape of ``x``.
            reverse: Integrate from ``T`` (base) to 0 (data).
            logdet: Integrate the log-determinant; ``False`` skips the trace entirely.
            return_stats: Also return the solve's :class:`FlowStats`.

        Returns:
            The image, shape ``(..., d)``, and ``log|det d(image)/dx|``, shape ``(...)``
            (``None`` when ``logdet=False``), then the :class:`FlowStats` if asked.
        """
        x, context = check_inputs(
            x, context, input_dim=self.input_dim, context_dim=self.context_dim, like=next(self.parameters(), None)
        )
        batch, d = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, d)
        if context is not None:
            context = context.reshape(-1, context.shape[-1])
        n = x.shape[0]
        regularize = self.regularize and logdet
        if n == 0:
            self.nfe = 0
            zeros = x.new_zeros(batch)
            stats = FlowStats(0, zeros, zeros) if regularize else FlowStats(0)
            out = x.clone().reshape(*batch, d), zeros if logdet else None
            return (*out, stats) if return_stats else out

        dynamics = self._dynamics(x, context, logdet)
        self._counter.nfe = 0
        t0, t1 = (self.T, 0.0) if reverse else (0.0, self.T)
        try:
            solution = self.solver.solve(
                dynamics,
                dynamics.initial_state(x),
                t0,
                t1,
                dynamics.error_norm(self.error_norm),
                self._adjoint_params(context),
                lambda reason: self._solver_error(dynamics, not reverse, f"adjoint (backward) solve: {reason}"),
                training=self._fitting(),
            )
        except SolverError as error:
            raise self._solver_error(dynamics, reverse, str(error)) from None
        finally:
            self.nfe = self._counter.nfe
        y, integrals = dynamics.split(solution)
        if not (torch.isfinite(y).all() and torch.isfinite(integrals).all()):
            raise self._solver_error(dynamics, reverse, "the solution is not finite")
        ladj = integrals[0].reshape(batch) if logdet else None
        out = y.reshape(*batch, d), ladj
        if not return_stats:
            return out
        if not regularize:
            return (*out, FlowStats(self.nfe))
        sign = -1.0 if reverse else 1.0  # the integrals run backwards in time
        return (*out, FlowStats(self.nfe, sign * integrals[1].reshape(batch), sign * integrals[2].reshape(batch)))

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` under this flow with a standard normal base at ``t = T``:
        ``log N(z; 0, I) + log|det dz/dx|``, shape ``x.shape[:-1]``.

        Example:
            >>> from pyro_cnf import ODENet
            >>> identity = ContinuousFlow(ODENet(2, (8,)))  # zero-initialised: the identity map
            >>> identity.log_prob(torch.zeros(1, 2)).detach()  # log N(0; 0, I) = -log(2 pi)
            tensor([-1.8379])
        """
        z, ladj = self(x, context)
        return standard_normal_log_prob(z) + ladj

    def _dynamics(self, x: Tensor, context: Tensor | None, logdet: bool) -> Dynamics:
        """The right-hand side of this solve, with its estimator and probes."""
        mode = self.trace_mode(x.shape[-1]) if logdet else "none"
        if mode in ("exact", "hutchinson") and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"the {mode} trace of this vector field (it has no closed-form divergence) needs "
                "autograd, which torch.inference_mode() forbids: run under torch.no_grad() instead, "
                "or pass logdet=False if no log-determinant is needed"
            )
        probe = identity_basis(x) if mode == "exact" else probe_noise(x, self.noise) if mode == "hutchinson" else None
        reg_probe = None
        if self.regularize and logdet:
            reg_probe = probe if mode == "hutchinson" else probe_noise(x, self.noise)
        return Dynamics(self.vector_field, context, mode, probe, reg_probe, tuple(x.shape), self._counter)

    def _adjoint_params(self, context: Tensor | None) -> tuple[Tensor, ...]:
        if not self.adjoint:
            return ()
        params = tuple(p for p in self.parameters() if p.requires_grad)
        return params + ((context,) if context is not None and context.requires_grad else ())

    def _solver_error(self, dynamics: Dynamics, reverse: bool, reason: str) -> SolverError:
        direction = "base -> data (t: T -> 0)" if reverse else "data -> base (t: 0 -> T)"
        broken = [name for name, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:  # no solver setting helps: say what does
            return SolverError(
                f"ODE solve {direction} failed: the flow's parameters hold NaN or inf "
                f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}), so its field does too. An "
                "optimiser step took a non-finite gradient (e.g. from a loss that overflowed at extreme "
                "samples); restore the parameters (a checkpoint) and lower the learning rate or clip the gradients."
            )
        reached = float("nan") if dynamics.t is None else float(dynamics.t.detach())
        rtol, atol = self.solver.tolerances(self._fitting())
        return SolverError(
            f"ODE solve {direction} failed: {reason}; last t evaluated {reached:.4g}, "
            f"{self._counter.nfe} function evaluations, method={self.method!r}, rtol={rtol}, "
            f"atol={atol}. Try looser tolerances, regularize=True or weight decay to tame "
            "the field, or a fixed-grid method (method='rk4', steps=8)."
        )


#: The :func:`default_flow` keywords that go to the :class:`~pyro_cnf.ODENet` field.
FIELD_OPTIONS = frozenset(
    {"activation", "zero_init", "time_gate_scale", "input_gain", "time_gain", "hidden_gain", "scale_rate"}
)


def default_flow(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    **kwargs: Any,
) -> ContinuousFlow:
    """A :class:`ContinuousFlow` over an :class:`~pyro_cnf.ODENet` field, as the adapters build it.

    ``hidden_dims`` defaults to ODENet's ``(64, 64)``; the field options
    (:data:`FIELD_OPTIONS`: ``activation``, ``zero_init``, ``time_gate_scale``, the three
    gains and ``scale_rate``) go to the field, with ODENet's defaults, and everything else to the flow.

    Example:
        >>> flow = default_flow(3, (16,), activation="silu", method="rk4", steps=4)
        >>> flow.vector_field.activation, flow.method
        ('silu', 'rk4')
    """
    field_kwargs = {name: kwargs.pop(name) for name in FIELD_OPTIONS & kwargs.keys()}
    if hidden_dims is not None:
        field_kwargs["hidden_dims"] = tuple(hidden_dims)
    return ContinuousFlow(ODENet(input_dim, context_dim=context_dim, **field_kwargs), **kwargs)


def resolve_flow(
    flow: ContinuousFlow | None,
    input_dim: int,
    hidden_dims: Sequence[int] | None,
    context_dim: int,
    flow_kwargs: Mapping[str, Any],
) -> ContinuousFlow:
    """The flow an adapter wraps: ``flow`` as given (checked against ``input_dim`` and
    ``context_dim``), or a :func:`default_flow` built from the settings; not both.

    Example:
        >>> resolve_flow(None, 2, (8,), 0, {}).input_dim
        2
        >>> resolve_flow(default_flow(2), 3, None, 0, {})
        Traceback (most recent call last):
        ...
        ValueError: input_dim=3 but the flow's field has input_dim=2
    """
    if flow is None:
        return default_flow(input_dim, hidden_dims, context_dim, **flow_kwargs)
    if flow_kwargs:
        raise ValueError(f"pass either flow= or flow settings, not both (got {sorted(flow_kwargs)})")
    if not isinstance(flow, ContinuousFlow):
        raise TypeError(f"flow must be a ContinuousFlow, got {type(flow).__name__}")
    if flow.input_dim not in (None, input_dim):
        raise ValueError(f"input_dim={input_dim} but the flow's field has input_dim={flow.input_dim}")
    if flow.context_dim is not None and flow.context_dim != context_dim:
        raise ValueError(f"context_dim={context_dim} but the flow's field has context_dim={flow.context_dim}")
    return flow
