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

References:
    | Neural Ordinary Differential Equations (Chen et al., 2018) https://arxiv.org/abs/1806.07366
    | FFJORD (Grathwohl et al., 2019) https://arxiv.org/abs/1810.01367
    | How to train your neural ODE (Finlay et al., 2020) https://arxiv.org/abs/2002.02798
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .nets import ODENet
from .solvers import METHODS as OWN_METHODS, SolverError, integrate
from .trace import cheapest_exact, exact_divergence, hutchinson_divergence, identity_basis, probe_noise

__all__ = ["ContinuousFlow", "SolverError", "AUTO_EXACT_MAX_DIM", "default_flow"]

ADAPTIVE_METHODS = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"})
FIXED_METHODS = frozenset(
    {"euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams"}
)
#: ``trace="auto"`` uses the exact VJP trace up to this dimension even when training a
#: field without a closed-form divergence. Measured cost of a training step (log-det and
#: backward; batch 1024, 2x64 MLP, rk4, 1 CPU thread), exact VJPs over Hutchinson: 1.7x at
#: d=2, 2.9x at d=4, 5.6x at d=8. Up to 4 the noise-free gradient is worth its price.
AUTO_EXACT_MAX_DIM = 4
#: Default cap on accepted + rejected adaptive steps; a healthy flow needs tens.
DEFAULT_MAX_STEPS = 1000
#: Options that :func:`pyro_cnf.solvers.integrate` understands; any other sends the solve
#: to torchdiffeq, which receives ``options`` unchanged.
OWN_OPTIONS = frozenset({"first_step", "max_num_steps", "safety", "ifactor", "dfactor"})


def _error_norm(kind: str, n: int, d: int) -> Callable[[Tensor], Tensor]:
    """The norm of a scaled local error of the state (see :class:`_Dynamics`): its first
    ``n * d`` entries are ``x``, the rest the log-det and RNODE integrals, ``n`` each.

    ``"mixed"`` is torchdiffeq's norm of a tuple state: the RMS of each component over the
    batch, then the maximum. ``"per_sample"`` takes the worst sample's RMS instead, so
    that no sample's local error is averaged away by its batch-mates.
    """
    nd = n * d
    if kind == "mixed":

        def mixed(r: Tensor) -> Tensor:
            sq = r.reshape(-1).square()
            return torch.cat((sq[:nd].mean().reshape(1), sq[nd:].view(-1, n).mean(1))).max().sqrt()

        return mixed
    if kind == "per_sample":

        def per_sample(r: Tensor) -> Tensor:
            sq = r.reshape(-1).square()
            return torch.cat((sq[:nd].view(n, d).mean(1), sq[nd:])).max().sqrt()

        return per_sample
    raise ValueError(f"error_norm must be 'mixed' or 'per_sample', got {kind!r}")


class _AdjointGuard(torch.autograd.Function):
    """Runs torchdiffeq's adjoint solve so that a failure of its backward solve, which
    torchdiffeq reports by ``assert``, surfaces from ``backward()`` as :class:`SolverError`."""

    @staticmethod
    def forward(ctx, solve, describe, state, *params):
        with torch.enable_grad():
            leaf = state.detach().requires_grad_(state.requires_grad)
            out = solve(leaf)
        ctx.graph, ctx.describe = (leaf, out, params), describe
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        leaf, out, params = ctx.graph
        inputs = (leaf, *params)
        wanted = [i for i in inputs if i.requires_grad]
        try:
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        except AssertionError as error:
            raise ctx.describe(str(error).split(":")[0]) from None
        return (None, None, *(next(grads) if i.requires_grad else None for i in inputs))


class _Dynamics:
    """The augmented right-hand side, configured once per solve.

    The state is one tensor: ``x`` alone, shape ``(N, d)``, when no log-det is wanted;
    else the flat ``[x.flatten(), logdet]``, shape ``(N d + N,)``, or
    ``[x.flatten(), logdet, kinetic, frobenius]``, ``(N d + 3 N,)``, with RNODE
    regularisation (``reg_probe`` given). One tensor, not a tuple, so that no solver packs
    and unpacks it at every evaluation, and flat, so that ``x`` is a contiguous view and
    packing the derivative is one contiguous copy.
    """

    def __init__(
        self,
        field: nn.Module,
        context: Tensor | None,
        mode: str,
        probe: Tensor | None,
        reg_probe: Tensor | None,
        shape: tuple[int, int],
    ) -> None:
        self.field = field
        self.shape = shape  # (N, d) of x
        self.size = shape[0] * shape[1]
        self.args = () if context is None else (context,)
        self.mode = mode
        self.probe = probe  # Hutchinson noise or the identity basis, fixed for the solve
        self.reg_probe = reg_probe  # noise for the Frobenius penalty, fixed for the solve
        self.nfe = 0
        self.t: Tensor | None = None
        if mode == "none":
            self._rhs = self._field_only
        elif mode == "closed" and reg_probe is None:
            self._rhs = self._closed_form
        elif mode == "closed" and hasattr(field, "divergence_jvp"):
            self._rhs = self._closed_regularized
        elif mode == "hutchinson" and hasattr(field, "jvp"):
            self._rhs = self._forward_mode
        else:
            self._rhs = self._autograd

    def __call__(self, t: Tensor, state: Tensor) -> Tensor:
        self.nfe += 1
        self.t = t
        return self._rhs(t, state)

    def _x(self, state: Tensor) -> Tensor:
        return state[: self.size].view(self.shape)

    @staticmethod
    def _pack(f: Tensor, *rates: Tensor) -> Tensor:
        return torch.cat((f.reshape(-1), *rates))

    def _checked(self, f: Tensor, x: Tensor) -> Tensor:
        if f.shape != x.shape:
            raise ValueError(
                f"the vector field returned shape {tuple(f.shape)}; expected the shape of x, "
                f"{tuple(x.shape)}"
            )
        return f

    def _field_only(self, t: Tensor, x: Tensor) -> Tensor:
        return self._checked(self.field(t, x, *self.args), x)

    def _closed_form(self, t: Tensor, state: Tensor) -> Tensor:
        x = self._x(state)
        f, div = self.field.divergence(t, x, *self.args)
        return self._pack(self._checked(f, x), div)

    def _closed_regularized(self, t: Tensor, state: Tensor) -> Tensor:
        x = self._x(state)
        f, div, jv = self.field.divergence_jvp(t, x, self.reg_probe, *self.args)
        return self._pack(self._checked(f, x), div, f.pow(2).sum(-1), jv.pow(2).sum(-1))

    def _forward_mode(self, t: Tensor, state: Tensor) -> Tensor:
        x = self._x(state)
        f, jv = self.field.jvp(t, x, self.probe, *self.args)
        self._checked(f, x)
        div = (jv * self.probe).sum(-1)
        if self.reg_probe is None:
            return self._pack(f, div)
        return self._pack(f, div, f.pow(2).sum(-1), jv.pow(2).sum(-1))

    def _autograd(self, t: Tensor, state: Tensor) -> Tensor:
        x = self._x(state)
        create_graph = torch.is_grad_enabled()
        regularize = self.reg_probe is not None
        with torch.enable_grad():
            if not (create_graph and x.requires_grad):  # no history to keep: a fresh leaf
                x = x.detach().requires_grad_()
            if self.mode == "closed":
                f, div = self.field.divergence(t, x, *self.args)
            else:
                f = self.field(t, x, *self.args)
            self._checked(f, x)
            vjp = None
            if self.mode == "exact":
                div = exact_divergence(f, x, self.probe, create_graph or regularize)
            elif self.mode == "hutchinson":
                div, vjp = hutchinson_divergence(f, x, self.probe, create_graph)
            if regularize and vjp is None:
                (vjp,) = torch.autograd.grad(f, x, self.reg_probe, create_graph=create_graph)
        if not regularize:
            return self._pack(f, div)
        return self._pack(f, div, f.pow(2).sum(-1), vjp.pow(2).sum(-1))


class ContinuousFlow(nn.Module):
    r"""A continuous normalizing flow: integrates ``(x, log|det|)`` between 0 and ``T``.

    ``flow(x)`` maps data (at ``t=0``) to base (at ``t=T``) and returns
    ``(y, log|det dy/dx|)``; ``flow(y, reverse=True)`` maps base to data and returns
    ``(x, log|det dx/dy|)``. Both come from one ODE solve.

    Arguments:
        vector_field: A module ``f(t, x)`` or ``f(t, x, context)`` returning a tensor shaped
            like ``x``; ``divergence(t, x[, context]) -> (f, div)`` and
            ``jvp(t, x, v[, context]) -> (f, J v)`` are used when present (see
            :mod:`pyro_cnf.nets`), autograd otherwise.
        T: The end time.
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"``. Auto is exact when the field has
            a closed-form divergence, in eval mode, or when ``d <= AUTO_EXACT_MAX_DIM``;
            Hutchinson otherwise. The exact trace of a field with a closed form is that or
            batched VJPs, whichever the field's ``trace_costs`` says is cheaper
            (:func:`~pyro_cnf.trace.cheapest_exact`). A runtime setting: changing it never
            touches the state dict.
        noise: Hutchinson probes, ``"rademacher"`` or ``"gaussian"``, drawn once per solve.
        method: A torchdiffeq method. Adaptive: dopri5, dopri8, bosh3, fehlberg2,
            adaptive_heun. Fixed-grid (need ``steps`` or ``options["step_size"]``): euler,
            midpoint, rk4, heun2, heun3, explicit_adams, implicit_adams.
        rtol, atol: Tolerances of adaptive methods.
        steps: Number of equal steps over ``[0, T]`` for fixed-grid methods; with
            ``dopri5`` (own solver), ``steps`` fixed fifth-order steps (``6 steps + 1``
            evaluations): more accurate per evaluation than ``rk4`` on smooth flows.
        adjoint: Use ``odeint_adjoint`` (memory constant in the number of steps) with the
            flow's parameters as ``adjoint_params``.
        options: Passed to torchdiffeq (``max_num_steps`` defaults to 1000; time runs in
            the input's dtype).
        adjoint_options: Passed to torchdiffeq for the adjoint solve; default seminorm.
            Fixed-grid methods integrate the adjoint on the forward's grid.
        error_norm: ``"mixed"`` (torchdiffeq's RMS per state component, pooled over the
            batch) or ``"per_sample"`` (worst sample's RMS: a sample's log-density no
            longer depends on its batch-mates beyond the tolerance).
        backend: ``"auto"`` solves with pyro_cnf's own flat-state Runge-Kutta
            (:mod:`pyro_cnf.solvers`: dopri5, rk4, midpoint, euler; same tableaus, error
            control and norm as torchdiffeq, less overhead per step) when it can: no
            adjoint and no option beyond ``first_step``, ``max_num_steps``, ``safety``,
            ``ifactor``, ``dfactor``. Everything else, and ``"torchdiffeq"``, goes through
            torchdiffeq's ``odeint``/``odeint_adjoint``.
        regularize: Integrate RNODE's kinetic energy :math:`\|f\|^2` and Jacobian
            Frobenius norm, :math:`\|\epsilon^\top J\|^2` (or :math:`\|J \epsilon\|^2` when the field
            has a forward-mode ``jvp``; both unbiased), along the solve; after each call
            they are in :attr:`kinetic_energy` and :attr:`jacobian_norm` (shape batch).

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
        steps: int | None = None,
        adjoint: bool = False,
        options: dict[str, Any] | None = None,
        adjoint_options: dict[str, Any] | None = None,
        error_norm: str = "mixed",
        regularize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not callable(vector_field):
            raise TypeError(f"vector_field must be a callable module, got {type(vector_field).__name__}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        self.vector_field = vector_field
        self.T = float(T)
        self.trace = trace
        self.noise = noise
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.steps = steps
        self.adjoint = adjoint
        self.options = dict(options or {})
        self.adjoint_options = dict(adjoint_options or {"norm": "seminorm"})
        self.error_norm = error_norm
        self.regularize = regularize
        self.backend = backend
        self.nfe = 0
        self.kinetic_energy: Tensor | None = None
        self.jacobian_norm: Tensor | None = None
        self._dynamics: _Dynamics | None = None
        self._solver_options(torch.zeros(2))  # fail at construction on bad settings

    @property
    def input_dim(self) -> int | None:
        return getattr(self.vector_field, "input_dim", None)

    @property
    def context_dim(self) -> int | None:
        return getattr(self.vector_field, "context_dim", None)

    @property
    def nfe_backward(self) -> int:
        return 0 if self._dynamics is None else self._dynamics.nfe - self.nfe

    def trace_mode(self, dim: int) -> str:
        """The estimator a solve in dimension ``dim`` uses now: closed, exact or hutchinson."""
        if self.trace not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"trace must be 'auto', 'exact' or 'hutchinson', got {self.trace!r}")
        if self.trace == "hutchinson":
            return "hutchinson"
        if hasattr(self.vector_field, "divergence"):  # exact: its closed form or VJPs, by cost
            return cheapest_exact(self.vector_field)
        if self.trace == "exact" or not self.training or dim <= AUTO_EXACT_MAX_DIM:
            return "exact"
        return "hutchinson"

    def _solver_options(self, t: Tensor) -> dict[str, Any]:
        """torchdiffeq options for a solve over the time points ``t`` (first, last);
        validates every setting."""
        options = dict(self.options)
        _error_norm(self.error_norm, 1, 1)
        if self.backend not in ("auto", "torchdiffeq"):
            raise ValueError(f"backend must be 'auto' or 'torchdiffeq', got {self.backend!r}")
        if self.steps is not None and (int(self.steps) != self.steps or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.method in ADAPTIVE_METHODS:
            if self.steps is not None and not (self.method in OWN_METHODS and self.uses_own_solver()):
                raise ValueError(
                    f"steps=N with the adaptive {self.method!r} asks for N fixed steps, which only "
                    "pyro_cnf's own dopri5 takes (backend='auto', adjoint=False, no torchdiffeq-only "
                    "options); pass steps=None for adaptive steps or a fixed-grid method"
                )
            options.setdefault("max_num_steps", DEFAULT_MAX_STEPS)
            options.setdefault("dtype", t.dtype)
            # Land the last step on the end time instead of stepping past it and reading a
            # dense-output interpolant there, whose error the tolerances do not control.
            options.setdefault("step_t", t[-1:])
            # torchdiffeq's initial-step heuristic starts at 1e-6 when f is near zero, as
            # every new (identity) flow is: 44 NFE instead of 13 for the first solves.
            options.setdefault("first_step", 0.1 * self.T)
        elif self.method in FIXED_METHODS:
            if self.steps is not None:
                n = int(self.steps)
                options["grid_constructor"] = lambda f, y0, t: torch.linspace(
                    t[0], t[-1], n + 1, dtype=t.dtype, device=t.device
                )
            elif "step_size" not in options and "grid_constructor" not in options:
                # torchdiffeq would silently take one single step over [0, T].
                raise ValueError(
                    f"method {self.method!r} is a fixed-grid solver: pass steps=N (N equal steps "
                    "over [0, T]) or options={'step_size': h}"
                )
        else:
            raise ValueError(
                f"unknown method {self.method!r}; expected one of "
                f"{sorted(ADAPTIVE_METHODS | FIXED_METHODS)}"
            )
        return options

    def _check_inputs(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        d = self.input_dim
        if x.dim() == 0 or (d is not None and x.shape[-1] != d):
            raise ValueError(f"x must have shape (..., {d or 'd'}), got {tuple(x.shape)}")
        param = next(self.parameters(), None)
        if param is not None and (param.dtype != x.dtype or param.device != x.device):
            raise TypeError(
                f"x is {x.dtype} on {x.device} but the flow's parameters are {param.dtype} on "
                f"{param.device}; move one to the other (flow.to(x) or x.to(...))"
            )
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        c = self.context_dim
        if context is None:
            if c:
                raise ValueError(f"this flow is conditional: pass context of shape (..., {c})")
            return x, None
        if c == 0:
            raise ValueError("this flow is not conditional (context_dim=0) but context was given")
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.dtype != x.dtype or context.device != x.device:
            raise TypeError(
                f"context is {context.dtype} on {context.device}; expected {x.dtype} on {x.device} like x"
            )
        if context.dim() == 0 or (c is not None and context.shape[-1] != c):
            raise ValueError(f"context must have shape (..., {c or 'c'}), got {tuple(context.shape)}")
        try:
            batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"context batch shape {tuple(context.shape[:-1])} does not broadcast with x batch "
                f"shape {tuple(x.shape[:-1])}"
            ) from None
        if not torch.isfinite(context).all():
            raise ValueError("context contains NaN or inf")
        return x.expand(*batch, x.shape[-1]), context.expand(*batch, context.shape[-1])

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        reverse: bool = False,
        logdet: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Integrate from 0 to ``T`` (or ``T`` to 0 when ``reverse``).

        Arguments:
            x: Input, shape ``(..., d)``; never modified.
            context: Shape ``(..., c)``, broadcast against the batch shape of ``x``.
            reverse: Integrate from ``T`` (base) to 0 (data).
            logdet: Integrate the log-determinant; ``False`` skips the trace entirely.

        Returns:
            The image, shape ``(..., d)``, and ``log|det d(image)/dx|``, shape ``(...)``
            (``None`` when ``logdet=False``).
        """
        x, context = self._check_inputs(x, context)
        batch, d = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, d)
        if context is not None:
            context = context.reshape(-1, context.shape[-1])
        n = x.shape[0]
        zeros = x.new_zeros(n)
        if n == 0:
            self.kinetic_energy = self.jacobian_norm = zeros.reshape(batch) if self.regularize else None
            return x.clone().reshape(*batch, d), zeros.reshape(batch) if logdet else None

        mode = self.trace_mode(d) if logdet else "none"
        probe = None
        if mode == "exact":
            probe = identity_basis(x)
        elif mode == "hutchinson":
            probe = probe_noise(x, self.noise)
        regularize = self.regularize and logdet
        reg_probe = None
        if regularize:
            reg_probe = probe if mode == "hutchinson" else probe_noise(x, self.noise)
        dynamics = _Dynamics(self.vector_field, context, mode, probe, reg_probe, (n, d))
        extra = 0 if mode == "none" else 3 if regularize else 1
        state = torch.cat((x.reshape(-1), x.new_zeros(extra * n))) if extra else x
        self._dynamics = dynamics
        try:
            solution = self._solve(dynamics, state, context, reverse)
        except (SolverError, AssertionError) as error:  # torchdiffeq reports failure by assertion
            raise self._solver_error(dynamics, reverse, str(error).split(":")[0]) from None
        finally:
            self.nfe = dynamics.nfe
        y = solution[: n * d].view(n, d)
        rates = solution[n * d :].view(extra, n)
        ladj = rates[0] if extra else None
        if not torch.isfinite(y).all() or (ladj is not None and not torch.isfinite(ladj).all()):
            raise self._solver_error(dynamics, reverse, "the solution is not finite")
        if regularize:
            sign = -1.0 if reverse else 1.0  # the integrals run backwards in time
            self.kinetic_energy = sign * rates[1].reshape(batch)
            self.jacobian_norm = sign * rates[2].reshape(batch)
        else:
            self.kinetic_energy = self.jacobian_norm = None
        return y.reshape(*batch, d), None if ladj is None else ladj.reshape(batch)

    def uses_own_solver(self) -> bool:
        """Whether a solve runs on :func:`pyro_cnf.solvers.integrate` rather than torchdiffeq."""
        return (
            self.backend == "auto"
            and not self.adjoint
            and self.method in OWN_METHODS
            and set(self.options) <= OWN_OPTIONS
        )

    def _solve(self, dynamics: _Dynamics, state: Tensor, context: Tensor | None, reverse: bool) -> Tensor:
        """The state at the end of the solve, shaped like ``state``."""
        t0, t1 = (self.T, 0.0) if reverse else (0.0, self.T)
        norm = _error_norm(self.error_norm, *dynamics.shape)
        if self.uses_own_solver():
            if self.steps is not None:
                options = {"steps": int(self.steps)}
            else:
                options = {"first_step": 0.1 * self.T, "max_num_steps": DEFAULT_MAX_STEPS, "norm": norm, **self.options}
            return integrate(dynamics, state, t0, t1, method=self.method, rtol=self.rtol, atol=self.atol, **options)
        t = torch.tensor([t0, t1], dtype=state.dtype, device=state.device)
        options = self._solver_options(t)
        if self.method in ADAPTIVE_METHODS:
            options.setdefault("norm", norm)
        kwargs: dict[str, Any] = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        if not self.adjoint:
            return odeint(dynamics, state, t, **kwargs)[-1]
        params = tuple(p for p in self.parameters() if p.requires_grad)
        if context is not None and context.requires_grad:
            params += (context,)
        adjoint_options = dict(self.adjoint_options)
        if self.method in FIXED_METHODS:  # else torchdiffeq takes the adjoint in ONE step
            for key in ("grid_constructor", "step_size"):
                if key in options and "step_size" not in adjoint_options:
                    adjoint_options.setdefault(key, options[key])
        kwargs.update(adjoint_params=params, adjoint_options=adjoint_options)

        def solve(s: Tensor) -> Tensor:
            return odeint_adjoint(dynamics, s, t, **kwargs)[-1]

        if not torch.is_grad_enabled():
            return solve(state)

        def describe(reason: str) -> SolverError:
            return self._solver_error(dynamics, not reverse, f"adjoint (backward) solve: {reason}")

        return _AdjointGuard.apply(solve, describe, state, *params)

    def _solver_error(self, dynamics: _Dynamics, reverse: bool, reason: str) -> SolverError:
        direction = "base -> data (t: T -> 0)" if reverse else "data -> base (t: 0 -> T)"
        reached = float("nan") if dynamics.t is None else float(dynamics.t.detach())
        return SolverError(
            f"ODE solve {direction} failed: {reason}; last t evaluated {reached:.4g}, "
            f"{dynamics.nfe} function evaluations, method={self.method!r}, rtol={self.rtol}, "
            f"atol={self.atol}. Try looser tolerances, regularize=True or weight decay to tame "
            "the field, or a fixed-grid method (method='rk4', steps=8)."
        )


def default_flow(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    *,
    activation: str = "softplus",
    zero_init: bool = True,
    **flow_kwargs: Any,
) -> ContinuousFlow:
    """A :class:`ContinuousFlow` over an :class:`~pyro_cnf.ODENet` field, as the adapters build it.

    ``hidden_dims`` defaults to ``(64, 64)``; ``activation`` and ``zero_init`` go to the
    field, everything else to the flow.

    Example:
        >>> flow = default_flow(3, (16,), activation="tanh", method="rk4", steps=4)
        >>> flow.vector_field.activation, flow.method
        ('tanh', 'rk4')
    """
    hidden = (64, 64) if hidden_dims is None else hidden_dims
    field = ODENet(input_dim, hidden, context_dim, activation=activation, zero_init=zero_init)
    return ContinuousFlow(field, **flow_kwargs)
