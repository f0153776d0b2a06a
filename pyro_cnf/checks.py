"""Input checks shared by the flow, flow matching and training: one place that says what
was wrong and what was expected (shape, dtype, device, NaN/inf)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_inputs"]


def _tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values; pass real data")
    return value


def check_inputs(
    x: Tensor,
    context: Tensor | None = None,
    *,
    input_dim: int | None,
    context_dim: int | None,
    like: Tensor | None = None,
    name: str = "x",
    rows: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Check ``x`` (and ``context``) for a field of ``input_dim`` (and ``context_dim``)
    whose parameters are like ``like``; return them broadcast to a common batch shape.

    Arguments:
        x: Shape ``(..., d)``; with ``rows``, ``(N >= 1, d)``. float32 or float64, finite.
        context: Shape ``(..., c)``, broadcasting against ``x``'s batch shape; with ``rows``,
            ``(N, c)``, one row per row of ``x``. Required exactly when ``context_dim`` is
            non-zero (``None``: unknown, either way).
        input_dim, context_dim: What the field expects; ``None`` if unknown.
        like: A parameter of the field: ``x`` must have its dtype and device.
        name: What the caller calls ``x``, for the messages.
        rows: Require a 2-D batch of rows, as training does.

    Raises:
        TypeError: not a tensor, a dtype that is not float32/float64, or a dtype or device
            other than the field's.
        ValueError: wrong shape, NaN or inf, context missing or unexpected.

    Example:
        >>> x, c = check_inputs(torch.zeros(4, 2), torch.zeros(1, 3), input_dim=2, context_dim=3)
        >>> c.shape
        torch.Size([4, 3])
        >>> check_inputs(torch.zeros(4, 3), input_dim=2, context_dim=0)
        Traceback (most recent call last):
        ...
        ValueError: x must have shape (..., 2), got (4, 3)
    """
    x = _tensor(x, name)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    wrong_dim = x.dim() == 0 or (input_dim is not None and x.shape[-1] != input_dim)
    if wrong_dim or (rows and (x.dim() != 2 or x.shape[0] == 0)):
        shape = f"({'N >= 1' if rows else '...'}, {input_dim or 'd'})"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if like is not None and (like.dtype != x.dtype or like.device != x.device):
        raise TypeError(
            f"{name} is {x.dtype} on {x.device} but the field's parameters are {like.dtype} on "
            f"{like.device}; move one to the other (module.to(x) or x.to(...))"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    c = context_dim or "c"
    if context is None:
        if context_dim:
            raise ValueError(f"the field is conditional: pass context of shape ({'N' if rows else '...'}, {c})")
        return x, None
    if context_dim == 0:
        raise ValueError("the field is not conditional (context_dim=0) but context was given")
    context = _tensor(context, "context")
    if context.dtype != x.dtype or context.device != x.device:
        raise TypeError(f"context is {context.dtype} on {context.device}; expected {x.dtype} on {x.device} like {name}")
    wrong_dim = context.dim() == 0 or (context_dim is not None and context.shape[-1] != context_dim)
    if rows and (wrong_dim or context.dim() != 2 or context.shape[0] != x.shape[0]):
        raise ValueError(
            f"context must have shape ({x.shape[0]}, {c}), one row per row of {name}, got {tuple(context.shape)}"
        )
    if wrong_dim:
        raise ValueError(f"context must have shape (..., {c}), got {tuple(context.shape)}")
    try:
        batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"context batch shape {tuple(context.shape[:-1])} does not broadcast with {name} batch "
            f"shape {tuple(x.shape[:-1])}"
        ) from None
    if not torch.isfinite(context).all():
        raise ValueError("context contains NaN or inf")
    if x.shape[:-1] != batch:
        x = x.expand(*batch, x.shape[-1])
    if context.shape[:-1] != batch:
        context = context.expand(*batch, context.shape[-1])
    return x, context
