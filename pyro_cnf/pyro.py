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

from .flow import ContinuousFlow, resolve_flow, takes_settings
from .presets import Preset

__all__ = ["CNF", "ConditionalCNF", "ConditionedCNF", "cnf", "conditional_cnf"]


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
      (``logdet=False``), the cost of drawing and nothing more.
    - ``log_prob`` of a point drawn by ``sample()`` (or by ``cnf(z)`` under
      ``no_grad``): such a draw is not cached, so ``log_prob`` solves data -> base from
      the point itself, with the trace, as for fresh data: one traced solve, as accurate
      as scoring fresh data. Drawing and scoring then costs a trace-free solve plus a
      traced one, at most 2x the one traced solve of ``rsample`` + ``log_prob``. When every
      sample will be scored, draw with ``rsample`` under grad, or set
      :attr:`trace_free_without_grad` to ``False`` (one traced solve under ``no_grad``
      too).
    """

    #: Skip the trace in ``_call`` when gradients are disabled (a later ``log_prob`` then
    #: solves from the drawn point). Set it to ``False`` on an
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
        # (z, x, log|det dx/dz|) of the last solve, the log-det None when it was skipped
        self._last_solve: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)

    def __call__(self, z: Tensor) -> Tensor:
        if self._cache_size and self._trace_free():
            # Not cached: log_prob of the drawn x then solves data -> base from x itself, as for
            # fresh data, so its accuracy is a fresh solve's. (Scoring the cached z instead would
            # add the trace-free solve's error in x, amplified by the density's gradient.)
            return self._call(z)
        return super().__call__(z)

    def _trace_free(self) -> bool:
        return self.trace_free_without_grad and not torch.is_grad_enabled()

    def _call(self, z: Tensor) -> Tensor:
        x, ladj = self.flow(z, self.context, reverse=True, logdet=not self._trace_free())
        self._last_solve = z, x, ladj
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        z, ladj = self.flow(x, self.context)
        self._last_solve = z, x, -ladj
        return z

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """``log|det dx/dz|`` of the base -> data map, shape = batch shape: the last solve's
        when ``(z, x)`` are the very tensors it took and gave (and the cache is on), else a
        new solve from ``z``."""
        z_last, x_last, ladj = self._last_solve
        if self._cache_size and z is z_last and x is x_last and ladj is not None:
            return ladj
        return self.flow(z, self.context, reverse=True)[1]

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
        self._last_solve = None, None, None


def _clear_cache_after_load(module: ConditionedCNF, incompatible_keys: Any) -> None:
    module.clear_cache()  # new parameters: the cached pair is stale


_SETTINGS_DOC = """preset: A name in :data:`~pyro_cnf.presets.PRESETS` (or a :class:`~pyro_cnf.presets.Preset`)
            where the field and solver settings start; ``None``: the class's own.
        flow: A :class:`~pyro_cnf.ContinuousFlow` to wrap instead of building one.
        **settings: Each replaces the preset's value: the field options of
            :class:`~pyro_cnf.ODENet` (``activation``, ``input_gain``, ``scale_rate``, ...) and
            the settings of :class:`~pyro_cnf.ContinuousFlow` (``trace``, ``method``,
            ``rtol``, ``atol``, ``adjoint``, ...); the signature lists them all."""


class CNF(ConditionedCNF, TransformModule):
    __doc__ = """Continuous normalizing flow as a Pyro :class:`TransformModule` (base -> data).

    Built from the ``"guide"`` preset unless told otherwise: ``CNF`` is what
    ``AutoNormalizingFlow`` and NeuTra guides are made of. For a density fit by
    likelihood, pass ``preset="density"``.

    Arguments:
        input_dim: The event dimension ``d``.
        hidden_dims: Hidden widths of the :class:`~pyro_cnf.ODENet` field (the preset's
            when ``None``).
        cache_size: Pyro's transform cache, 0 or 1.
        %s

    Example:
        >>> import pyro.distributions as dist
        >>> transform = CNF(2, hidden_dims=(16, 16))
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow_dist = dist.TransformedDistribution(base, [transform])
        >>> x = flow_dist.rsample((5,))
        >>> flow_dist.log_prob(x).shape  # served from the cache: one solve in all
        torch.Size([5])
        >>> transform.flow.preset, transform.flow.vector_field.activation
        ('guide', 'silu')
    """ % _SETTINGS_DOC

    __repr__ = torch.nn.Module.__repr__

    @takes_settings
    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        *,
        preset: str | Preset | None = None,
        flow: ContinuousFlow | None = None,
        cache_size: int = 1,
        **settings: Any,
    ) -> None:
        flow = resolve_flow("CNF", flow, input_dim, 0, preset, "guide", hidden_dims, settings)
        super().__init__(flow, None, cache_size=cache_size)
        self.input_dim = input_dim
        self.register_load_state_dict_post_hook(_clear_cache_after_load)


class ConditionalCNF(ConditionalTransformModule):
    __doc__ = """Conditional continuous flow; ``condition(context)`` returns a caching transform.

    Built from the ``"conditional"`` preset unless told otherwise (a conditional density
    fit by likelihood, as a conditional :class:`~pyro_cnf.CNFTransform` is).

    Arguments:
        input_dim: The event dimension ``d``.
        context_dim: The context dimension ``c`` (the flow's when ``flow`` is given and
            this is ``None``); context batch dims broadcast against the input's.
        hidden_dims: Hidden widths of the :class:`~pyro_cnf.ODENet` field (the preset's
            when ``None``).
        %s

    Example:
        >>> import pyro.distributions as dist
        >>> transform = ConditionalCNF(2, context_dim=3, hidden_dims=(16, 16))
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow_dist = dist.ConditionalTransformedDistribution(base, [transform])
        >>> flow_dist.condition(torch.randn(3)).sample((4,)).shape
        torch.Size([4, 2])
    """ % _SETTINGS_DOC

    @takes_settings
    def __init__(
        self,
        input_dim: int,
        context_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        *,
        preset: str | Preset | None = None,
        flow: ContinuousFlow | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if flow is None and context_dim is None:
            raise TypeError("ConditionalCNF: context_dim is required (or pass flow= with a conditional field)")
        self.flow = resolve_flow("ConditionalCNF", flow, input_dim, context_dim, preset, "conditional",
                                 hidden_dims, settings)
        self.input_dim = input_dim
        self.context_dim = self.flow.context_dim if context_dim is None else context_dim

    def condition(self, context: Tensor) -> ConditionedCNF:
        return ConditionedCNF(self.flow, context)


@takes_settings
def cnf(
    input_dim: int, hidden_dims: Sequence[int] | None = None, *, preset: str | Preset | None = None, **settings: Any
) -> CNF:
    """A :class:`CNF` in Pyro's factory manner (the ``"guide"`` preset unless ``preset=`` says
    otherwise).

    Example:
        >>> from functools import partial
        >>> make = partial(cnf, hidden_dims=[32, 32])  # e.g. AutoNormalizingFlow(model, make)
        >>> make(3).flow.vector_field.hidden_dims
        (32, 32)
    """
    return CNF(input_dim, hidden_dims, preset=preset, **settings)


@takes_settings
def conditional_cnf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    preset: str | Preset | None = None,
    **settings: Any,
) -> ConditionalCNF:
    """A :class:`ConditionalCNF` in Pyro's factory manner (the ``"conditional"`` preset unless
    ``preset=`` says otherwise)."""
    return ConditionalCNF(input_dim, context_dim, hidden_dims, preset=preset, **settings)
