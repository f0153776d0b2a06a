r"""Two-dimensional toy densities (the shapes of the FFJORD experiments), drawn in code.

Every dataset is a function of ``(n, seed)`` alone: the same seed gives the same points on
any device and in any dtype (they are drawn in float64 on the CPU, then converted). All
of them live roughly in :math:`[-4, 4]^2`.

Two have a closed-form density, :func:`true_log_prob`:

- ``checkerboard``: uniform on the 8 squares of side 2 with an even index sum in the
  4 x 4 board over :math:`[-4, 4]^2`. Total area 32, so :math:`\log p = -\log 32` on the
  support and the true NLL is exactly :math:`\log 32 \approx 3.466`.
- ``8gaussians``: an equal mixture of 8 isotropic Gaussians of standard deviation
  :data:`GAUSSIANS_STD` centred on the circle of radius :data:`GAUSSIANS_RADIUS`. The
  components barely overlap, so the true NLL is the entropy of one component plus
  :math:`\log 8`: :math:`\log 8 + \log(2 \pi e \sigma^2) \approx 2.837`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["NAMES", "sample", "true_log_prob", "GAUSSIANS_RADIUS", "GAUSSIANS_STD"]

#: The radius of the circle of the 8 Gaussians' centres.
GAUSSIANS_RADIUS = 2.0 * math.sqrt(2.0)
#: The standard deviation of each of the 8 Gaussians.
GAUSSIANS_STD = 0.5 / math.sqrt(2.0)
#: The side of a checkerboard square; the board is 4 x 4 squares centred on the origin.
CHECKER_SIDE = 2.0


def _eight_centres(dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
    angle = torch.arange(8, dtype=dtype, device=device) * (2 * math.pi / 8)
    return GAUSSIANS_RADIUS * torch.stack((torch.cos(angle), torch.sin(angle)), -1)


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    k = torch.randint(8, (n,), generator=g)
    return _eight_centres()[k] + GAUSSIANS_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    # Square (i, j) of the 4 x 4 board is kept when i + j is even: column i, then a row of
    # the same parity.
    i = torch.randint(4, (n,), generator=g)
    j = 2 * torch.randint(2, (n,), generator=g) + i % 2
    corner = torch.stack((i, j), -1).double() * CHECKER_SIDE - 2 * CHECKER_SIDE
    return corner + CHECKER_SIDE * torch.rand(n, 2, generator=g, dtype=torch.float64)


def _two_spirals(n: int, g: torch.Generator) -> Tensor:
    # Archimedean arms r = theta over one and a half turns; sqrt spaces points evenly in arc length.
    theta = 3 * math.pi * torch.rand(n, generator=g, dtype=torch.float64).sqrt()
    arm = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0).double()
    r = theta / 3.0
    points = arm.unsqueeze(-1) * torch.stack((-r * torch.cos(theta), r * torch.sin(theta)), -1)
    return points + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _pinwheel(n: int, g: torch.Generator, blades: int = 5) -> Tensor:
    # Gaussian blobs at radius 1 bent by a rotation that grows exponentially with radius.
    blade = torch.randint(blades, (n,), generator=g)
    radial = 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    tangential = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    angle = blade * (2 * math.pi / blades) + 0.25 * torch.exp(radial)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return 2.0 * torch.stack((cos * radial - sin * tangential, sin * radial + cos * tangential), -1)


def _moons(n: int, g: torch.Generator) -> Tensor:
    # Two interleaved half circles of radius 1, then centred and scaled by 2.
    angle = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    lower = torch.rand(n, generator=g) < 0.5
    x = torch.where(lower, 1 - torch.cos(angle), torch.cos(angle))
    y = torch.where(lower, 0.5 - torch.sin(angle), torch.sin(angle))
    points = torch.stack((x - 0.5, y - 0.25), -1)
    return 2.0 * (points + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64))


def _rings(n: int, g: torch.Generator) -> Tensor:
    # Four concentric circles, radii 1 to 4 (scaled by 0.9), each holding points in
    # proportion to its circumference so that the density along every ring is the same.
    radii = torch.arange(1, 5, dtype=torch.float64)
    cdf = radii.cumsum(0) / radii.sum()
    ring = torch.searchsorted(cdf, torch.rand(n, generator=g, dtype=torch.float64), right=True)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    r = 0.9 * radii[ring]
    points = r.unsqueeze(-1) * torch.stack((torch.cos(angle), torch.sin(angle)), -1)
    return points + 0.08 * torch.randn(n, 2, generator=g, dtype=torch.float64)


_SAMPLERS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "pinwheel": _pinwheel,
    "moons": _moons,
    "rings": _rings,
}
#: The dataset names, for :func:`sample`.
NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def _check_name(name: str) -> None:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")


def sample(
    name: str,
    n: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` points of the toy density ``name``.

    Arguments:
        name: One of :data:`NAMES`.
        n: The number of points, ``>= 0``.
        seed: Any integer a :class:`torch.Generator` accepts; the points depend on it alone.
        device, dtype: Where the result lives.

    Returns:
        A tensor of shape ``(n, 2)``.

    Example:
        >>> x = sample("checkerboard", 5, seed=1)
        >>> x.shape, torch.equal(x, sample("checkerboard", 5, seed=1))
        (torch.Size([5, 2]), True)
    """
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    return _SAMPLERS[name](n, generator).to(device=device, dtype=dtype)


def _checkerboard_log_prob(x: Tensor) -> Tensor:
    cell = torch.floor((x + 2 * CHECKER_SIDE) / CHECKER_SIDE)
    inside = ((cell >= 0) & (cell <= 3)).all(-1) & (cell.sum(-1) % 2 == 0)
    area = 8 * CHECKER_SIDE**2
    return torch.full_like(x[..., 0], -math.log(area)).masked_fill(~inside, -math.inf)


def _eight_gaussians_log_prob(x: Tensor) -> Tensor:
    centres = _eight_centres(x.dtype, x.device)
    sq = (x.unsqueeze(-2) - centres).pow(2).sum(-1) / GAUSSIANS_STD**2
    log_component = -0.5 * sq - math.log(2 * math.pi * GAUSSIANS_STD**2)
    return torch.logsumexp(log_component, -1) - math.log(8)


_LOG_PROBS: dict[str, Callable[[Tensor], Tensor]] = {
    "checkerboard": _checkerboard_log_prob,
    "8gaussians": _eight_gaussians_log_prob,
}


def true_log_prob(name: str, x: Tensor) -> Tensor | None:
    """The exact log-density of ``name`` at ``x``, or ``None`` where it has no closed form.

    Arguments:
        name: One of :data:`NAMES`.
        x: Points, shape ``(..., 2)``, float32 or float64.

    Returns:
        Shape ``(...)``, in ``x``'s dtype and device (``-inf`` off the support), or ``None``
        for ``2spirals``, ``pinwheel``, ``moons`` and ``rings``.

    Example:
        >>> true_log_prob("checkerboard", torch.tensor([[-3.0, -3.0], [-1.0, -3.0]]))
        tensor([-3.4657,    -inf])
        >>> true_log_prob("moons", torch.zeros(1, 2)) is None
        True
    """
    _check_name(name)
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (..., 2), got {got}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    log_prob = _LOG_PROBS.get(name)
    return None if log_prob is None else log_prob(x)
