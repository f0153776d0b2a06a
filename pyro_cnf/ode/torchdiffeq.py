"""The torchdiffeq backend: every method and option of ``odeint`` and ``odeint_adjoint``.

torchdiffeq is imported on the first solve that needs it, not with :mod:`pyro_cnf`.
Failures, which torchdiffeq reports by ``assert`` (in the adjoint's case from inside
``backward()``), surface as :class:`~pyro_cnf.ode.rk.SolverError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .rk import SolverError

__all__ = ["solve"]

if TYPE_CHECKING:
    from . import Solver


def _options(solver: Solver, t1: Tensor) -> dict[str, Any]:
    """torchdiffeq's ``options``: the user's, plus pyro_cnf's defaults for adaptive methods
    and the grid of ``steps`` for fixed ones; ``t1`` is the end time, shape ``(1,)``."""
    options = dict(solver.options)
    if solver.adaptive:
        options.setdefault("max_num_steps", solver.max_num_steps)
        options.setdefault("dtype", t1.dtype)  # float64 time is unsupported on MPS
        # Land the last step on the end time instead of stepping past it and reading a
        # dense-output interpolant there, whose error the tolerances do not control.
        options.setdefault("step_t", t1)
    elif solver.steps is not None:
        steps = solver.steps
        options["grid_constructor"] = lambda f, y0, t: torch.linspace(
            t[0], t[-1], steps + 1, dtype=t.dtype, device=t.device
        )
    return options


class _AdjointGuard(torch.autograd.Function):
    """Runs torchdiffeq's adjoint solve so that a failure of its backward solve, which
    torchdiffeq reports by ``assert``, surfaces from ``backward()`` as :class:`SolverError`.

    The inner graph is kept (``retain_graph=True``) for as long as the outer one lives, so
    that a second backward through the same graph works, as it does with torchdiffeq's
    ``odeint_adjoint`` alone (``torch.autograd.functional.jacobian`` needs it); it holds only
    what the adjoint itself saves, and goes with the outer graph.
    """

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
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True, retain_graph=True))
        except AssertionError as error:
            raise ctx.describe(str(error).split(":")[0]) from None
        return (None, None, *(next(grads) if i.requires_grad else None for i in inputs))


def solve(
    solver: Solver,
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t0: float,
    t1: float,
    norm: Callable[[Tensor], Tensor],
    adjoint_params: Sequence[Tensor] = (),
    describe_backward: Callable[[str], SolverError] | None = None,
    *,
    rtol: float,
    atol: float,
) -> Tensor:
    """The state at ``t1`` by ``odeint``, or by ``odeint_adjoint`` when ``solver.adjoint``
    (differentiating ``adjoint_params``; a failure of the backward solve raises
    ``describe_backward(reason)``). ``norm`` is the error norm of adaptive methods.
    ``rtol``/``atol`` are :meth:`Solver.tolerances` of this solve. Raises
    :class:`SolverError` with torchdiffeq's reason when the forward solve fails."""
    from torchdiffeq import odeint, odeint_adjoint

    t = torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)
    options = _options(solver, t[-1:])
    if solver.adaptive:
        options.setdefault("norm", norm)
        # torchdiffeq's initial-step rule starts at 1e-6 when f is near zero, as every
        # new (identity) flow is: 44 evaluations instead of 13 for the first solves.
        options.setdefault("first_step", 0.1 * abs(t1 - t0))
    kwargs: dict[str, Any] = dict(rtol=rtol, atol=atol, method=solver.method, options=options)
    try:
        if not solver.adjoint:
            return odeint(func, y0, t, **kwargs)[-1]
        adjoint_options = dict(solver.adjoint_options)
        if solver.adaptive:  # the backward solve gets the forward's step budget, not torchdiffeq's 2^31 - 1
            adjoint_options.setdefault("max_num_steps", solver.max_num_steps)
        else:  # else torchdiffeq takes the adjoint in ONE step
            for key in ("grid_constructor", "step_size"):
                if key in options and "step_size" not in adjoint_options:
                    adjoint_options.setdefault(key, options[key])
        kwargs.update(adjoint_params=tuple(adjoint_params), adjoint_options=adjoint_options)

        def adjoint_solve(state: Tensor) -> Tensor:
            return odeint_adjoint(func, state, t, **kwargs)[-1]

        if not torch.is_grad_enabled():
            return adjoint_solve(y0)
        return _AdjointGuard.apply(adjoint_solve, describe_backward, y0, *adjoint_params)
    except AssertionError as error:
        raise SolverError(str(error).split(":")[0]) from None
