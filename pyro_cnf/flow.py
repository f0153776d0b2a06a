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
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .checks import check_inputs
from .dynamics import ERROR_NORMS, Counter, Dynamics
from .nets import ODENet, check_widths
from .ode import Solver, SolverError
from .presets import Preset, get_preset
from .trace import AUTO_EXACT_MAX_DIM, ESTIMATORS, NOISES, identity_basis, probe_noise, trace_mode

__all__ = [
    "AUTO_EXACT_MAX_DIM",
    "ContinuousFlow",
    "FlowStats",
    "SolverError",
    "FIELD_OPTIONS",
    "FLOW_OPTIONS",
    "build_flow",
    "default_flow",
    "resolve_flow",
    "takes_settings",
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


def _tolerance(index: int, training: bool) -> property:
    """A tolerance as a solve uses it (:meth:`~pyro_cnf.ode.Solver.tolerances`); assigning
    one gives it, as the constructor's keyword does."""
    name = ("train_" if training else "") + ("rtol", "atol")[index]

    def get(self: ContinuousFlow) -> float:
        return self.solver.tolerances(training)[index]

    def set(self: ContinuousFlow, value: float) -> None:
        object.__setattr__(self, "solver", dataclasses.replace(self.solver, **{name: value}))

    return property(get, set, doc=f"``{name}`` of a solve; assigning validates it.")


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
        solver: A :class:`pyro_cnf.ode.Solver` holding the solver settings (its defaults:
            adaptive ``dopri5`` at ``rtol = atol = 1e-5``, loosened to ``1e-3`` for a solve
            that is differentiated in training mode when no tolerance is given at all).
        method, rtol, atol, train_rtol, train_atol, steps, adjoint, options, adjoint_options,
            backend: Shortcuts for the :class:`~pyro_cnf.ode.Solver` settings of the same
            names; each one given replaces ``solver``'s. A tolerance given applies to every
            solve, training included, unless ``train_rtol``/``train_atol`` are given too.
            The own Runge-Kutta runs ``dopri5``, ``rk4``, ``midpoint``, ``euler`` and
            ``dopri5`` on a grid of ``steps`` (fifth-order steps, ``6 steps + 1``
            evaluations); the adjoint and every other method go to torchdiffeq.
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
        error_norm: str = "mixed",
        regularize: bool = False,
        solver: Solver | None = None,
        method: str | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        train_rtol: float | None = None,
        train_atol: float | None = None,
        steps: int | None = None,
        adjoint: bool | None = None,
        options: Mapping[str, Any] | None = None,
        adjoint_options: Mapping[str, Any] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(vector_field):
            raise TypeError(f"vector_field must be a callable module, got {type(vector_field).__name__}")
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"solver must be a pyro_cnf.ode.Solver, got {type(solver).__name__}")
        shortcuts = dict(method=method, rtol=rtol, atol=atol, train_rtol=train_rtol, train_atol=train_atol,
                         steps=steps, adjoint=adjoint, options=options, adjoint_options=adjoint_options,
                         backend=backend)
        given = {name: value for name, value in shortcuts.items() if value is not None}
        self.vector_field = vector_field
        self._estimation = _Estimation(T, trace, noise, error_norm, regularize)
        self.solver = dataclasses.replace(solver, **given) if solver is not None else Solver(**given)
        self.preset: str | None = None
        self._counter = Counter()
        self.nfe = 0

    T = _setting("_estimation", "T")
    trace = _setting("_estimation", "trace")
    noise = _setting("_estimation", "noise")
    error_norm = _setting("_estimation", "error_norm")
    regularize = _setting("_estimation", "regularize")
    method = _setting("solver", "method")
    rtol = _tolerance(0, training=False)
    atol = _tolerance(1, training=False)
    train_rtol = _tolerance(0, training=True)
    train_atol = _tolerance(1, training=True)
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

    def extra_repr(self) -> str:
        settings = {"preset": self.preset, "T": self.T, "trace": self.trace, "method": self.method}
        if self.solver.steps is not None or not self.solver.adaptive:
            settings["steps"] = self.steps
        else:
            settings.update(rtol=self.rtol, atol=self.atol, train_rtol=self.train_rtol, train_atol=self.train_atol)
        defaults = {"noise": "rademacher", "error_norm": "mixed", "regularize": False, "adjoint": False,
                    "backend": "auto", "options": {}}
        settings.update({k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v})
        return ", ".join(f"{k}={v!r}" for k, v in settings.items() if not (k == "preset" and v is None))

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


#: The settings of :func:`default_flow` and the adapters that go to the :class:`~pyro_cnf.ODENet`
#: field: ODENet's own keywords (``hidden_dims`` has a parameter of its own).
FIELD_OPTIONS = frozenset(inspect.signature(ODENet).parameters) - {"input_dim", "context_dim", "hidden_dims"}
#: The settings that go to the :class:`ContinuousFlow`: its own keywords.
FLOW_OPTIONS = frozenset(inspect.signature(ContinuousFlow).parameters) - {"vector_field"}


def takes_settings(function: Callable) -> Callable:
    """Show the field and flow settings that ``function`` takes through ``**settings`` in its
    signature, as keyword-only parameters (``None``: the preset's value), so that ``help()``
    and editors list them. The names come from :data:`FIELD_OPTIONS` and
    :data:`FLOW_OPTIONS`, which the signatures of ODENet and ContinuousFlow define."""
    signature = inspect.signature(function)
    own = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    sources = (inspect.signature(ODENet).parameters, inspect.signature(ContinuousFlow).parameters)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=source[name].annotation)
        for source, names in zip(sources, (FIELD_OPTIONS, FLOW_OPTIONS))
        for name in source if name in names and name not in signature.parameters
    ]
    function.__signature__ = signature.replace(parameters=own + extra)
    return function


def build_flow(
    owner: str,
    input_dim: int,
    context_dim: int,
    preset: str | Preset,
    hidden_dims: Sequence[int] | None,
    settings: Mapping[str, Any],
) -> ContinuousFlow:
    """A :class:`ContinuousFlow` over an :class:`~pyro_cnf.ODENet` from ``preset`` with
    ``settings`` replacing its values; ``owner`` (the class or function the user called) is
    named in every error."""
    preset = get_preset(preset, owner)
    settings = {k: v for k, v in settings.items() if v is not None}  # None: the preset's value
    unknown = set(settings) - FIELD_OPTIONS - FLOW_OPTIONS
    if unknown:
        raise TypeError(
            f"{owner}() got unexpected keyword argument(s) {', '.join(map(repr, sorted(unknown)))}; its settings "
            f"are the field's {sorted(FIELD_OPTIONS)} and the flow's {sorted(FLOW_OPTIONS)}"
        )
    field = {**preset.field, **{k: v for k, v in settings.items() if k in FIELD_OPTIONS}}
    if hidden_dims is not None:
        field["hidden_dims"] = check_widths(hidden_dims, owner)
    flow_settings = {k: v for k, v in settings.items() if k in FLOW_OPTIONS}
    # a method chosen by the user comes without the preset's grid
    inherited = {k: v for k, v in preset.flow.items() if not ("method" in flow_settings and k in ("steps", "options"))}
    flow = ContinuousFlow(ODENet(input_dim, context_dim=context_dim, **field), **{**inherited, **flow_settings})
    flow.preset = preset.name
    return flow


def default_flow(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    *,
    preset: str | Preset = "density",
    **settings: Any,
) -> ContinuousFlow:
    """A :class:`ContinuousFlow` over an :class:`~pyro_cnf.ODENet` field, as the adapters build it.

    Arguments:
        input_dim: The dimension ``d``.
        hidden_dims: The field's hidden widths (the preset's when ``None``).
        context_dim: The context dimension, 0 for none.
        preset: A name in :data:`~pyro_cnf.presets.PRESETS`, where the settings start.
        **settings: Field options (:data:`FIELD_OPTIONS`) and flow settings
            (:data:`FLOW_OPTIONS`), each replacing the preset's.

    Example:
        >>> flow = default_flow(3, (16,), activation="silu", method="rk4", steps=4)
        >>> flow.vector_field.activation, flow.method, flow.preset
        ('silu', 'rk4', 'density')
    """
    return build_flow("default_flow", input_dim, context_dim, preset, hidden_dims, settings)


takes_settings(default_flow)


def resolve_flow(
    owner: str,
    flow: ContinuousFlow | None,
    input_dim: int,
    context_dim: int | None,
    preset: str | Preset | None,
    default_preset: str,
    hidden_dims: Sequence[int] | None,
    settings: Mapping[str, Any],
) -> ContinuousFlow:
    """The flow an adapter (``owner``) wraps: ``flow`` as given, checked against
    ``input_dim`` and ``context_dim`` (``None``: the flow's), or one built from ``preset``
    (``default_preset`` when ``None``) and the settings; not both.

    Example:
        >>> resolve_flow("CNF", None, 2, None, None, "guide", (8,), {}).vector_field.activation
        'silu'
        >>> resolve_flow("CNF", default_flow(2), 3, None, None, "guide", None, {})
        Traceback (most recent call last):
        ...
        ValueError: CNF: input_dim=3 but the flow's field has input_dim=2
    """
    if flow is None:
        return build_flow(owner, input_dim, context_dim or 0, preset or default_preset, hidden_dims, settings)
    given = sorted([*settings, *(["hidden_dims"] if hidden_dims is not None else []),
                    *(["preset"] if preset is not None else [])])
    if given:
        raise ValueError(f"{owner}: pass either flow= or settings to build one, not both (got {given})")
    if not isinstance(flow, ContinuousFlow):
        raise TypeError(f"{owner}: flow must be a ContinuousFlow, got {type(flow).__name__}")
    if flow.input_dim not in (None, input_dim):
        raise ValueError(f"{owner}: input_dim={input_dim} but the flow's field has input_dim={flow.input_dim}")
    if context_dim is not None and flow.context_dim is not None and flow.context_dim != context_dim:
        raise ValueError(f"{owner}: context_dim={context_dim} but the flow's field has context_dim={flow.context_dim}")
    return flow
