"""nflows adapter: :class:`CNFTransform`, data -> noise in nflows' convention, and
:class:`CNFFlow`, an nflows ``Flow`` whose ``sample`` skips the log-determinant.

nflows' ``Flow.sample`` draws through ``transform.inverse``, whose contract is to return
a log-determinant that ``sample`` then throws away: inside a plain ``Flow`` every sample
from a :class:`CNFTransform` pays for the trace. :class:`CNFFlow` draws through
:func:`inverse_without_logdet` instead, which runs the trace-free solve for CNF parts;
``log_prob`` and ``sample_and_log_prob`` still integrate the log-determinant, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from nflows.flows import Flow
from nflows.transforms.base import CompositeTransform, InverseTransform, Transform
from torch import Tensor

from .flow import ContinuousFlow, resolve_flow, takes_settings
from .presets import Preset, get_preset

__all__ = ["CNFFlow", "CNFTransform", "forward_without_logdet", "inverse_without_logdet"]


class CNFTransform(Transform):
    """Continuous normalizing flow as an nflows :class:`~nflows.transforms.base.Transform`.

    ``forward(inputs, context)`` integrates data -> noise (0 to ``T``) and
    ``inverse(inputs, context)`` noise -> data; both return ``(outputs, logabsdet)`` with
    ``logabsdet = log|det d outputs / d inputs|`` of shape ``[batch]``, from one solve.

    Built from the ``"density"`` preset, or ``"conditional"`` with a ``context_dim``, unless
    ``preset=`` says otherwise.

    Arguments:
        input_dim: The feature dimension ``d`` (nflows' name, ``features``, works too).
        hidden_dims: Hidden widths of the :class:`~pyro_cnf.ODENet` field, the preset's
            when ``None`` (``hidden_features``: an int, the width of each of the preset's
            layers, or a sequence of widths).
        context_dim: The context dimension of a conditional flow (``context_features``);
            the flow's when ``flow`` is given and this is ``None``.
        preset: A name in :data:`~pyro_cnf.presets.PRESETS` (or a
            :class:`~pyro_cnf.presets.Preset`) where the settings start; ``None``:
            ``"density"``, or ``"conditional"`` with a ``context_dim``.
        flow: A :class:`~pyro_cnf.ContinuousFlow` to wrap instead of building one.
        **settings: Each replaces the preset's value: the field options of
            :class:`~pyro_cnf.ODENet` and the settings of :class:`~pyro_cnf.ContinuousFlow`
            (``trace``, ``method``, ``rtol``, ...); the signature lists them all.

    Example:
        >>> from nflows.distributions import StandardNormal
        >>> from nflows.flows import Flow
        >>> flow = Flow(CNFTransform(2, hidden_dims=(16, 16)), StandardNormal([2]))
        >>> flow.log_prob(torch.randn(8, 2)).shape
        torch.Size([8])
        >>> CNFTransform(features=3, hidden_features=32).flow.vector_field.hidden_dims
        (32, 32)
    """

    @takes_settings
    def __init__(
        self,
        input_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        *,
        context_dim: int | None = None,
        preset: str | Preset | None = None,
        flow: ContinuousFlow | None = None,
        features: int | None = None,
        context_features: int | None = None,
        hidden_features: int | Sequence[int] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        input_dim = _one_of("input_dim", input_dim, "features", features, required=True)
        context_dim = _one_of("context_dim", context_dim, "context_features", context_features)
        hidden_dims = _one_of("hidden_dims", hidden_dims, "hidden_features", hidden_features)
        default = "conditional" if context_dim else "density"
        if isinstance(hidden_dims, int) and hidden_features is not None:  # nflows' width of every layer
            hidden_dims = (hidden_dims,) * len(get_preset(preset or default, "CNFTransform").field["hidden_dims"])
        self.input_dim = input_dim
        self.flow = resolve_flow("CNFTransform", flow, input_dim, context_dim, preset, default, hidden_dims, settings)

    def _solve(
        self, inputs: Tensor, context: Tensor | None, reverse: bool, logdet: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(inputs, Tensor) and inputs.dim() != 2:
            raise ValueError(f"inputs must have shape [batch, {self.input_dim}], got {tuple(inputs.shape)}")
        rows = isinstance(context, Tensor) and self.flow.context_dim  # else the flow says what is wrong
        if rows and (context.dim() != 2 or context.shape[0] != inputs.shape[0]):
            raise ValueError(
                f"context must have shape [batch, context_dim] with the {inputs.shape[0]} rows of "
                f"inputs, got {tuple(context.shape)}"
            )
        return self.flow(inputs, context, reverse=reverse, logdet=logdet)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(inputs, context, reverse=False)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(inputs, context, reverse=True)

    def forward_without_logdet(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """Data -> noise, the outputs of :meth:`forward` alone: one solve without the trace."""
        return self._solve(inputs, context, reverse=False, logdet=False)[0]

    def inverse_without_logdet(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """Noise -> data, the outputs of :meth:`inverse` alone: one solve without the
        trace, what sampling needs (see :class:`CNFFlow`)."""
        return self._solve(inputs, context, reverse=True, logdet=False)[0]


def _one_of(name: str, value: Any, alias: str, alias_value: Any, required: bool = False) -> Any:
    """A setting given by our name or nflows' (``alias``), not both."""
    if value is not None and alias_value is not None:
        raise TypeError(f"CNFTransform: pass {name} or nflows' name {alias}, not both")
    if required and value is None and alias_value is None:
        raise TypeError(f"CNFTransform: missing the feature dimension: pass {name} (or nflows' name {alias})")
    return alias_value if value is None else value


def _outputs(transform: Transform, inputs: Tensor, context: Tensor | None, inverse: bool) -> Tensor:
    if isinstance(transform, CompositeTransform):
        parts = transform._transforms
        for part in reversed(parts) if inverse else parts:
            inputs = _outputs(part, inputs, context, inverse)
        return inputs
    if isinstance(transform, InverseTransform):  # its inverse is the wrapped forward
        return _outputs(transform._transform, inputs, context, not inverse)
    own = getattr(transform, "inverse_without_logdet" if inverse else "forward_without_logdet", None)
    if own is not None:
        return own(inputs, context)
    return (transform.inverse if inverse else transform)(inputs, context)[0]


def inverse_without_logdet(transform: Transform, inputs: Tensor, context: Tensor | None = None) -> Tensor:
    """``transform.inverse(inputs, context)[0]`` without integrating any CNF's trace.

    Walks :class:`~nflows.transforms.CompositeTransform` (in reverse) and
    :class:`~nflows.transforms.InverseTransform`; a part with an
    ``inverse_without_logdet`` (``forward_without_logdet``) method, such as
    :class:`CNFTransform`, runs it; any other part runs its own ``inverse`` (``forward``)
    and its log-determinant is dropped.

    Example:
        >>> from nflows.transforms import ReversePermutation
        >>> t = CompositeTransform([CNFTransform(2, hidden_dims=(8,)), ReversePermutation(2)])
        >>> z = torch.randn(4, 2)
        >>> torch.allclose(inverse_without_logdet(t, z), t.inverse(z)[0], atol=1e-4)
        True
    """
    return _outputs(transform, inputs, context, inverse=True)


def forward_without_logdet(transform: Transform, inputs: Tensor, context: Tensor | None = None) -> Tensor:
    """``transform(inputs, context)[0]`` without integrating any CNF's trace (data -> noise);
    see :func:`inverse_without_logdet`."""
    return _outputs(transform, inputs, context, inverse=False)


class CNFFlow(Flow):
    """An nflows :class:`~nflows.flows.Flow` whose ``sample`` skips every CNF's trace.

    nflows' ``Flow.sample`` maps noise to data through ``transform.inverse`` and drops the
    log-determinant it returns; a :class:`CNFTransform` would integrate it all the same.
    ``CNFFlow`` draws through :func:`inverse_without_logdet`: the same samples (the same
    noise gives the same points up to the solver's tolerance) at the cost of the
    trace-free solve. Everything else is nflows' ``Flow``: ``log_prob`` and
    ``sample_and_log_prob`` integrate the exact log-determinant in the same solve, and a
    ``CNFFlow`` goes wherever a ``Flow`` goes (sbi's ``NFlowsFlow`` included).
    ``transform_to_noise`` also skips the trace.

    Arguments: those of :class:`~nflows.flows.Flow` (``transform``, ``distribution``,
    ``embedding_net``).

    Example:
        >>> from nflows.distributions import StandardNormal
        >>> flow = CNFFlow(CNFTransform(2, hidden_dims=(16,), context_dim=3), StandardNormal([2]))
        >>> context = torch.randn(5, 3)
        >>> flow.sample(4, context=context).shape   # one trace-free solve
        torch.Size([5, 4, 2])
        >>> flow.log_prob(torch.randn(5, 2), context=context).shape  # exact, with the trace
        torch.Size([5])
    """

    def _sample(self, num_samples: int, context: Tensor | None) -> Tensor:
        embedded = self._embedding_net(context)
        noise = self._distribution.sample(num_samples, context=embedded)
        if embedded is None:
            return inverse_without_logdet(self._transform, noise)
        rows = embedded.shape[0]  # noise: (rows, num_samples, ...), one block per context row
        flat = noise.reshape(rows * num_samples, *noise.shape[2:])
        samples = inverse_without_logdet(
            self._transform, flat, torch.repeat_interleave(embedded, num_samples, dim=0)
        )
        return samples.reshape(rows, num_samples, *samples.shape[1:])

    def transform_to_noise(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        return forward_without_logdet(self._transform, inputs, self._embedding_net(context))
