r"""Simulation-free training of continuous flows by conditional flow matching.

Flow matching regresses the field onto the velocity of a path that joins each data
point to its own base sample, with no ODE solve while training; the trained field then
drives a :class:`~pyro_cnf.ContinuousFlow`, whose likelihood is exact.

Conventions are the library's: data at :math:`t = 0`, the standard-normal base at
:math:`t = T`. (Lipman et al. and torchcfm put noise at 0 and data at 1; here both the
path and its velocity are reversed.) With :math:`s = t / T`, a data row :math:`x` and
its base sample :math:`z \sim \mathcal{N}(0, I)`, every path is

.. math:: x_t = \alpha(s)\, x + \sigma(s)\, z, \qquad
   u_t = \frac{\mathrm{d} x_t}{\mathrm{d} t} = \frac{\alpha'(s)\, x + \sigma'(s)\, z}{T},

with :math:`\alpha(0) = 1, \sigma(0) = \sigma_\mathrm{min}` (data smoothed by
:math:`\mathcal{N}(0, \sigma_\mathrm{min}^2 I)`) and :math:`\alpha(1) = 0, \sigma(1) = 1`
(the base, exactly). The marginal field :math:`\mathbb{E}[u_t \mid x_t]`, the minimiser
of the loss, transports data to the base along the marginal paths.

References:
    | Flow Matching for Generative Modeling (Lipman et al., 2023) https://arxiv.org/abs/2210.02747
    | Flow Straight and Fast (Liu et al., 2023) https://arxiv.org/abs/2209.03003
    | Improving and generalizing flow-based generative models with minibatch optimal
      transport (Tong et al., 2024) https://arxiv.org/abs/2302.00482
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .checks import check_inputs
from .flow import ContinuousFlow

__all__ = ["PATHS", "COUPLINGS", "conditional_path", "flow_matching_loss", "minibatch_ot_pairing"]

Schedule = Callable[[Tensor, float], tuple[Tensor, Tensor, Tensor, Tensor]]


def _ot_schedule(s: Tensor, sigma_min: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Straight lines at constant speed: the conditional optimal-transport path.
    one = torch.ones_like(s)
    return 1 - s, sigma_min + (1 - sigma_min) * s, -one, (1 - sigma_min) * one


def _cosine_schedule(s: Tensor, sigma_min: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # alpha^2 + sigma^2 = 1 when sigma_min = 0: variance preserving for whitened data.
    angle = 0.5 * math.pi * s
    cos, sin = torch.cos(angle), torch.sin(angle)
    return cos, sigma_min + (1 - sigma_min) * sin, -0.5 * math.pi * sin, 0.5 * math.pi * (1 - sigma_min) * cos


#: Conditional paths by name: ``s -> (alpha, sigma, dalpha/ds, dsigma/ds)``.
#: ``"ot"``: :math:`\alpha = 1 - s`, :math:`\sigma = \sigma_\mathrm{min} + (1 - \sigma_\mathrm{min}) s`
#: (rectified flow / conditional OT). ``"cosine"``: :math:`\alpha = \cos(\pi s / 2)`,
#: :math:`\sigma = \sigma_\mathrm{min} + (1 - \sigma_\mathrm{min}) \sin(\pi s / 2)`.
PATHS: dict[str, Schedule] = {"ot": _ot_schedule, "cosine": _cosine_schedule}
#: ``"independent"`` pairs each row with a fresh base sample; ``"minibatch_ot"`` re-pairs
#: the batch by an exact assignment minimising the total squared distance.
COUPLINGS = ("independent", "minibatch_ot")


def conditional_path(
    x_data: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    path: str = "ot",
    sigma_min: float = 1e-4,
    T: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""The point :math:`x_t` on the conditional path from ``x_data`` (t=0) to ``noise``
    (t=T) and its velocity :math:`u_t = \mathrm{d}x_t/\mathrm{d}t`.

    Arguments:
        x_data: Data, shape ``(N, d)``.
        noise: Base samples, shape ``(N, d)``.
        t: Times in ``[0, T]``, shape ``(N, 1)`` (or anything broadcasting against ``x_data``).
        path: A name in :data:`PATHS`.
        sigma_min: The path's noise scale at ``t = 0``, in ``[0, 1)``.
        T: The end time.

    Returns:
        ``(x_t, u_t)``, both shaped like ``x_data``.

    Example:
        >>> x, z = torch.zeros(2, 1), torch.ones(2, 1)
        >>> conditional_path(x, z, torch.tensor([[0.0], [0.5]]), sigma_min=0.0)
        (tensor([[0.0000],
                [0.5000]]), tensor([[1.],
                [1.]]))
    """
    _check_path(path, sigma_min, T)
    alpha, sigma, dalpha, dsigma = PATHS[path](t / T, sigma_min)
    return alpha * x_data + sigma * noise, (dalpha * x_data + dsigma * noise) / T


def minibatch_ot_pairing(x: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
    r"""The permutation ``perm`` minimising :math:`\sum_i \|x_i - z_{\mathrm{perm}_i}\|^2`.

    With ``context``, rows are paired only with rows of an identical context, so that
    the base samples given each context stay standard normal (pairing across contexts
    would skew them towards that context's data); continuous contexts, all distinct,
    thus leave the independent pairing.

    Arguments:
        x: Data, shape ``(N, d)``.
        z: Base samples, shape ``(N, d)``.
        context: Optional, shape ``(N, c)``.

    Returns:
        A long tensor of shape ``(N,)`` on ``x``'s device: pair ``x[i]`` with ``z[perm[i]]``.

    The exact assignment (:func:`scipy.optimize.linear_sum_assignment`, on the CPU) costs
    up to :math:`O(N^3)`: on one CPU thread about 25 ms for N = 256 and 150-200 ms for
    N = 512 with 1-2-dimensional data, so keep flow-matching batches near 256 with it.

    Example:
        >>> minibatch_ot_pairing(torch.tensor([[0.0], [5.0]]), torch.tensor([[4.0], [1.0]]))
        tensor([1, 0])
    """
    if x.dim() != 2 or x.shape != z.shape:
        raise ValueError(
            f"x and z must have the same shape (N, d), got {tuple(x.shape)} and {tuple(z.shape)}"
        )
    if context is not None and (context.dim() != 2 or context.shape[0] != x.shape[0]):
        raise ValueError(f"context must have shape ({x.shape[0]}, c), got {tuple(context.shape)}")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:  # scipy is an optional dependency
        raise ImportError("coupling='minibatch_ot' needs scipy: pip install scipy") from error
    n = x.shape[0]
    if context is None:
        groups = [torch.arange(n, device=x.device)]
    else:
        _, label = torch.unique(context, dim=0, return_inverse=True)
        groups = [torch.nonzero(label == g).squeeze(-1) for g in range(int(label.max()) + 1)]
    perm = torch.empty(n, dtype=torch.long, device=x.device)
    for rows in groups:
        cost = torch.cdist(x[rows].detach().double(), z[rows].detach().double()).pow(2)
        _, cols = linear_sum_assignment(cost.cpu().numpy())
        perm[rows] = rows[torch.as_tensor(cols, device=x.device)]
    return perm


def flow_matching_loss(
    vector_field: nn.Module,
    x_data: Tensor,
    *,
    context: Tensor | None = None,
    path: str = "ot",
    sigma_min: float = 1e-4,
    coupling: str = "independent",
    T: float = 1.0,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Conditional flow matching loss :math:`\frac1N \sum_i \|f(t_i, x_{t_i}[, c_i]) - u_{t_i}\|^2`.

    Draws :math:`t_i \sim U(0, T)` and :math:`z_i \sim \mathcal{N}(0, I)` per row, pairs
    them with the data by ``coupling``, and regresses the field on the path velocity
    (see :func:`conditional_path`). Train with it, then evaluate the exact likelihood with
    ``ContinuousFlow(vector_field, T=T)``.

    The field is called as ``vector_field(t, x_t)`` or ``vector_field(t, x_t, context)``
    with one time per row, ``t`` of shape ``(N, 1)``: it broadcasts against ``x`` like
    the 0-d time of an ODE solve, so :class:`~pyro_cnf.ODENet` and simple hand-written
    fields accept both.

    Arguments:
        vector_field: The field to train (e.g. ``flow.vector_field`` of a
            :class:`~pyro_cnf.ContinuousFlow`, or of a ``ConditionalCNF``'s ``.flow``).
        x_data: Data, shape ``(N, d)``, float32 or float64.
        context: Shape ``(N, c)`` for a conditional field.
        path: A name in :data:`PATHS`.
        sigma_min: The path's noise scale at ``t = 0``, in ``[0, 1)``.
        coupling: A name in :data:`COUPLINGS`.
        T: The end time, as in the flow that will use the field.
        t: Fixed times, shape ``(N,)`` or ``(N, 1)``, instead of uniform draws.
        noise: Fixed base samples, shape ``(N, d)``, instead of normal draws.
        generator: The random generator for ``t`` and ``noise``.

    Returns:
        The loss, a 0-d tensor.

    Example:
        >>> from pyro_cnf import ContinuousFlow, ODENet
        >>> from pyro_cnf.presets import PRESETS
        >>> field = ODENet(2, (16, 16))
        >>> optimizer = torch.optim.Adam(field.parameters(), lr=PRESETS["density"].lr)
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     loss = flow_matching_loss(field, torch.randn(64, 2) + 3.0)
        ...     loss.backward()
        ...     optimizer.step()
        >>> z, ladj = ContinuousFlow(field)(torch.randn(5, 2) + 3.0)  # exact log-det
        >>> loss.shape, z.shape, ladj.shape
        (torch.Size([]), torch.Size([5, 2]), torch.Size([5]))
    """
    _check_path(path, sigma_min, T)
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {list(COUPLINGS)}, got {coupling!r}")
    _check_field(vector_field)
    param = next(vector_field.parameters(), None) if isinstance(vector_field, nn.Module) else None
    x_data, context = check_inputs(
        x_data,
        context,
        input_dim=getattr(vector_field, "input_dim", None),
        context_dim=getattr(vector_field, "context_dim", None),
        like=param,
        name="x_data",
        rows=True,
    )
    n, d = x_data.shape
    like = dict(dtype=x_data.dtype, device=x_data.device)
    if t is None:
        t = T * torch.rand(n, 1, generator=generator, **like)
    else:
        t = _checked_times(t, n, T, x_data)
    if noise is None:
        noise = torch.randn(n, d, generator=generator, **like)
    elif not isinstance(noise, Tensor) or noise.shape != x_data.shape or noise.dtype != x_data.dtype:
        raise ValueError(
            f"noise must be a {x_data.dtype} tensor of shape {tuple(x_data.shape)} like x_data, got "
            + (f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, Tensor) else type(noise).__name__)
        )
    elif not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf")
    if coupling == "minibatch_ot":
        noise = noise[minibatch_ot_pairing(x_data, noise, context)]
    x_t, u_t = conditional_path(x_data, noise, t, path=path, sigma_min=sigma_min, T=T)
    v = vector_field(t, x_t) if context is None else vector_field(t, x_t, context)
    if not isinstance(v, Tensor) or v.shape != x_t.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"the vector field returned {got} for a per-row time t of shape {tuple(t.shape)}; expected "
            f"the shape of x, {tuple(x_t.shape)} (the field must accept one time per row)"
        )
    return (v - u_t).pow(2).sum(-1).mean()


def _check_path(path: str, sigma_min: float, T: float) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {path!r}")
    if not 0 <= sigma_min < 1:
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"T must be a finite number > 0, got {T}")


def _check_field(vector_field: nn.Module) -> None:
    if isinstance(vector_field, ContinuousFlow):
        raise TypeError(
            "flow_matching_loss trains a vector field, got a ContinuousFlow: pass "
            "flow.vector_field (and T=flow.T)"
        )
    if not callable(vector_field):
        raise TypeError(f"vector_field must be a callable module, got {type(vector_field).__name__}")


def _checked_times(t: Tensor, n: int, T: float, x: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.shape not in ((n,), (n, 1)):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t must be a tensor of shape ({n},) or ({n}, 1), one time per row, got {got}")
    if not ((t >= 0) & (t <= T)).all():
        raise ValueError(f"t must lie in [0, T] = [0, {T}]")
    return t.reshape(n, 1).to(x)
