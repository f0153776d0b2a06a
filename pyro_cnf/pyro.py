"""Pyro adapters: :class:`CNF`, :class:`ConditionalCNF` and the factories ``cnf`` and
``conditional_cnf``.

Pyro's transforms map base -> data: ``cnf(z)`` integrates from ``T`` down to 0 and
``cnf.inv(x)`` from 0 up to ``T``. Both directions compute the log-determinant in the
same solve and cache it, so an SVI step (``rsample`` then ``log_prob`` of that sample)
costs one ODE solve, as does ``log_prob`` of data. Under ``torch.no_grad()`` (where
``TransformedDistribution.sample`` runs its transforms) ``cnf(z)`` skips the trace: see
:class:`ConditionedCNF`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from .flow import ContinuousFlow, resolve_flow

__all__ = ["CNF", "ConditionalCNF", "ConditionedCNF", "GUIDE_FIELD", "cnf", "conditional_cnf"]


class ConditionedCNF(Transform):
    """A continuous flow bound to a context (``None`` for none), as a caching Pyro transform.

    ``_call`` maps base -> data, ``_inverse`` data -> base; each stores the
    log-determinant of the base -> data map, which :meth:`log_abs_det_jacobian` serves
    when asked about the pair it has cached (by tensor identity, in Pyro's manner) and
    otherwise recomputes.

    Costs, in ODE solves:

    - ``rsample`` then ``log_prob`` of that sample (an SVI step), or ``log_prob`` of data:
      one solve with the trace.
    - ``sample()``: ``TransformedDistribution.sample`` runs the transforms under
      ``torch.no_grad()``, and there ``_call`` solves without the trace
      (``logdet=False``), the cost of drawing and nothing more (measured on 10 000
      points: a quarter to a third of a traced solve for a 2x64 ``ODENet``, under a
      thirtieth for 4x64, whose closed-form trace carries a per-sample Jacobian; see
      the README).
    - ``log_prob`` of a point drawn by ``sample()`` (or by ``cnf(z)`` under
      ``no_grad``): the log-determinant was not integrated, so the first
      :meth:`log_abs_det_jacobian` on that cached pair solves once more, base -> data
      from the cached ``z`` with the trace (one solve with the trace, as for fresh
      data), and caches it for later calls. Drawing and scoring then costs a trace-free
      solve plus a traced one: 1.2-1.3x the one traced solve of ``rsample`` +
      ``log_prob`` for a 2x64 ``ODENet``, about 1x for 4x64, at most 2x. When every
      sample will be scored, draw with ``rsample`` under grad, or set
      :attr:`trace_free_without_grad` to ``False`` (one traced solve under ``no_grad``
      too).
    """

    #: Skip the trace in ``_call`` when gradients are disabled (the log-det is then
    #: computed on demand by :meth:`log_abs_det_jacobian`). Set it to ``False`` on an
    #: instance, or on ``ConditionedCNF`` itself for every transform (those that
    #: ``ConditionalCNF.condition`` makes included), to integrate it in the same solve.
    trace_free_without_grad: bool = True

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: ContinuousFlow, context: Tensor | None = None, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.flow = flow
        self.context = context
        self._cached_ladj: Tensor | None = None

    def _call(self, z: Tensor) -> Tensor:
        if self.trace_free_without_grad and not torch.is_grad_enabled():
            x, _ = self.flow(z, self.context, reverse=True, logdet=False)
            self._cached_ladj = None  # log_abs_det_jacobian computes it if asked
            return x
        x, ladj = self.flow(z, self.context, reverse=True)
        self._cached_ladj = ladj
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        z, ladj = self.flow(x, self.context)
        self._cached_ladj = -ladj
        return z

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """``log|det dx/dz|`` of the base -> data map, shape = batch shape."""
        z_old, x_old = getattr(self, "_cached_x_y", (None, None))
        if z is z_old and x is x_old:
            if self._cached_ladj is None:  # drawn without the trace: integrate it from z now
                self._cached_ladj = self.flow(z, self.context, reverse=True)[1]
            return self._cached_ladj
        return self.flow(z, self.context, reverse=True)[1]  # leaves the cached pair intact

    def with_cache(self, cache_size: int = 1) -> ConditionedCNF:
        if cache_size == self._cache_size:
            return self
        copy = ConditionedCNF(self.flow, self.context, cache_size=cache_size)
        copy.trace_free_without_grad = self.trace_free_without_grad
        return copy

    def clear_cache(self) -> None:
        """Forget the cached pair (Pyro's ``TransformedDistribution.clear_cache()`` calls
        this): needed when the same input tensor is passed again after the parameters
        changed, e.g. a full-batch training loop on one data tensor."""
        self._cached_x_y = None, None
        self._cached_ladj = None


#: The field settings :class:`CNF` uses when it is given no ``flow`` (keywords of
#: :func:`~pyro_cnf.default_flow`; any of them may be passed instead). :class:`CNF` is what
#: ``AutoNormalizingFlow`` and NeuTra guides are made of, and a guide fit by reverse KL must
#: stretch the base out to the posterior's tails and learn scales that depend on other
#: coordinates (a funnel's): ``silu`` units grow linearly where ``tanh``, ODENet's default for
#: density fitting, saturates; a scale rate (``scale_rate``) lets the field scale each
#: coordinate at a rate set by the others, the map of an affine autoregressive flow; and a
#: first layer that starts sharper and learns faster (``input_gain``) makes the first steps
#: fast (BENCHMARKS.md, "Scale rate"). ODENet's faster time and hidden layers (``time_gain``,
#: ``hidden_gain``) are left out: SVI's noisier gradients make them cost at lr 5e-3 and above
#: (BENCHMARKS.md, "Gains").
GUIDE_FIELD: dict[str, Any] = {
    "activation": "silu", "input_gain": 4.0, "time_gain": 1.0, "hidden_gain": 1.0, "scale_rate": 4.0
}


def _clear_cache_after_load(module: ConditionedCNF, incompatible_keys: Any) -> None:
    module.clear_cache()  # new parameters: the cached pair is stale


class CNF(ConditionedCNF, TransformModule):
    """Continuous normalizing flow as a Pyro :class:`TransformModule` (base -> data).

    Arguments:
        input_dim: The event dimension ``d``.
        hidden_dims: Hidden widths of the default :class:`~pyro_cnf.ODENet` field.
        flow: A :class:`~pyro_cnf.ContinuousFlow` to wrap instead of building one.
        **flow_kwargs: The field options of :func:`~pyro_cnf.default_flow` (defaults from
            :data:`GUIDE_FIELD`, else ODENet's), the rest for
            :class:`~pyro_cnf.ContinuousFlow` (``trace``, ``method``, ``rtol``, ``adjoint``, ...).

    Example:
        >>> import pyro.distributions as dist
        >>> transform = CNF(2, hidden_dims=(16, 16))
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow_dist = dist.TransformedDistribution(base, [transform])
        >>> x = flow_dist.rsample((5,))
        >>> flow_dist.log_prob(x).shape  # served from the cache: one solve in all
        torch.Size([5])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = (64, 64),
        *,
        flow: ContinuousFlow | None = None,
        cache_size: int = 1,
        **flow_kwargs: Any,
    ) -> None:
        if flow is None:
            flow_kwargs = {**GUIDE_FIELD, **flow_kwargs}
        super().__init__(resolve_flow(flow, input_dim, hidden_dims, 0, flow_kwargs), None, cache_size=cache_size)
        self.input_dim = input_dim
        self.register_load_state_dict_post_hook(_clear_cache_after_load)


class ConditionalCNF(ConditionalTransformModule):
    """Conditional continuous flow; ``condition(context)`` returns a caching transform.

    Arguments:
        input_dim: The event dimension ``d``.
        context_dim: The context dimension ``c``; context batch dims broadcast against
            the input's.
        hidden_dims: Hidden widths of the default :class:`~pyro_cnf.ODENet` field.
        flow: A conditional :class:`~pyro_cnf.ContinuousFlow` to wrap instead.
        **flow_kwargs: The field options of :func:`~pyro_cnf.default_flow` (ODENet's
            defaults, made for conditional density fitting), the rest for
            :class:`~pyro_cnf.ContinuousFlow`.

    Example:
        >>> import pyro.distributions as dist
        >>> transform = ConditionalCNF(2, context_dim=3, hidden_dims=(16, 16))
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow_dist = dist.ConditionalTransformedDistribution(base, [transform])
        >>> flow_dist.condition(torch.randn(3)).sample((4,)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = (64, 64),
        *,
        flow: ContinuousFlow | None = None,
        **flow_kwargs: Any,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.flow = resolve_flow(flow, input_dim, hidden_dims, context_dim, flow_kwargs)

    def condition(self, context: Tensor) -> ConditionedCNF:
        return ConditionedCNF(self.flow, context)


def cnf(input_dim: int, hidden_dims: Sequence[int] | None = None, **kwargs: Any) -> CNF:
    """A :class:`CNF` in Pyro's factory manner; the field defaults to :data:`GUIDE_FIELD`.

    Example:
        >>> from functools import partial
        >>> make = partial(cnf, hidden_dims=[32, 32])  # e.g. AutoNormalizingFlow(model, make)
        >>> make(3).flow.vector_field.hidden_dims
        (32, 32)
    """
    return CNF(input_dim, hidden_dims, **kwargs)


def conditional_cnf(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None, **kwargs: Any
) -> ConditionalCNF:
    """A :class:`ConditionalCNF` in Pyro's factory manner."""
    return ConditionalCNF(input_dim, context_dim, hidden_dims, **kwargs)
