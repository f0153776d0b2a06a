"""nflows adapter: :class:`CNFTransform`, data -> noise in nflows' convention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nflows.transforms.base import Transform
from torch import Tensor

from .flow import ContinuousFlow, resolve_flow

__all__ = ["CNFTransform"]


class CNFTransform(Transform):
    """Continuous normalizing flow as an nflows :class:`~nflows.transforms.base.Transform`.

    ``forward(inputs, context)`` integrates data -> noise (0 to ``T``) and
    ``inverse(inputs, context)`` noise -> data; both return ``(outputs, logabsdet)`` with
    ``logabsdet = log|det d outputs / d inputs|`` of shape ``[batch]``, from one solve.

    Arguments:
        input_dim: The feature dimension ``d``.
        hidden_dims: Hidden widths of the default :class:`~pyro_cnf.ODENet` field.
        context_dim: The context dimension for a conditional flow, or ``None``.
        flow: A :class:`~pyro_cnf.ContinuousFlow` to wrap instead of building one.
        **flow_kwargs: ``activation`` and ``zero_init`` for the field, the rest for
            :class:`~pyro_cnf.ContinuousFlow`.

    Example:
        >>> from nflows.distributions import StandardNormal
        >>> from nflows.flows import Flow
        >>> flow = Flow(CNFTransform(2, hidden_dims=(16, 16)), StandardNormal([2]))
        >>> flow.log_prob(torch.randn(8, 2)).shape
        torch.Size([8])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        *,
        context_dim: int | None = None,
        flow: ContinuousFlow | None = None,
        **flow_kwargs: Any,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.flow = resolve_flow(flow, input_dim, hidden_dims, context_dim or 0, flow_kwargs)

    def _solve(self, inputs: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if isinstance(inputs, Tensor) and inputs.dim() != 2:
            raise ValueError(f"inputs must have shape [batch, {self.input_dim}], got {tuple(inputs.shape)}")
        rows = isinstance(context, Tensor) and self.flow.context_dim  # else the flow says what is wrong
        if rows and (context.dim() != 2 or context.shape[0] != inputs.shape[0]):
            raise ValueError(
                f"context must have shape [batch, context_dim] with the {inputs.shape[0]} rows of "
                f"inputs, got {tuple(context.shape)}"
            )
        return self.flow(inputs, context, reverse=reverse)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(inputs, context, reverse=False)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(inputs, context, reverse=True)
