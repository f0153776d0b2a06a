"""A four-panel picture of a 2-D continuous flow: data, density, samples, trajectories.

Drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so importing this
module leaves pyplot's global backend alone.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import Tensor
from ..flow import ContinuousFlow
from ..ode.rk import integrate_adaptive
from ..training.checkpoint import write_atomic

__all__ = ["density_grid", "trajectories", "plot_flow"]


def density_grid(
    flow: ContinuousFlow, lim: float = 4.5, size: int = 150, batch_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """The flow's exact log-density on a ``size x size`` grid over ``[-lim, lim]^2``.

    Returns:
        ``(axis, log_prob)``: the grid's coordinates along either axis, shape ``(size,)``,
        and the log-density, shape ``(size, size)`` indexed ``[y, x]`` (image order).

    Example:
        >>> from pyro_cnf import ODENet
        >>> axis, log_prob = density_grid(ContinuousFlow(ODENet(2, (8,))), size=5)
        >>> axis.shape, log_prob.shape, round(log_prob[2, 2].item(), 4)  # -log(2 pi) at 0
        (torch.Size([5]), torch.Size([5, 5]), -1.8379)
    """
    like = next(flow.parameters())
    axis = torch.linspace(-lim, lim, size, dtype=like.dtype, device=like.device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack((x, y), -1).reshape(-1, 2)
    training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            log_prob = torch.cat([flow.log_prob(chunk) for chunk in points.split(batch_size)])
    finally:
        flow.train(training)
    return axis, log_prob.reshape(size, size)


def trajectories(flow: ContinuousFlow, z: Tensor, times: int = 41) -> Tensor:
    """Paths of base points ``z`` (shape ``(N, 2)``) to data space, solving the flow's
    field from ``t = T`` down to ``t = 0`` with ``times`` equally spaced outputs.

    Returns:
        Shape ``(times, N, 2)``; index 0 is ``z`` (base), index ``-1`` the data point.

    Example:
        >>> from pyro_cnf import ODENet
        >>> paths = trajectories(ContinuousFlow(ODENet(2, (8,))), torch.ones(3, 2), times=4)
        >>> paths.shape, torch.equal(paths[-1], torch.ones(3, 2))  # the identity flow stays put
        (torch.Size([4, 3, 2]), True)
    """
    t = torch.linspace(flow.T, 0.0, times).tolist()
    points = [z]
    with torch.no_grad():  # one adaptive solve per segment, each landing on its output time
        for t0, t1 in zip(t[:-1], t[1:]):
            points.append(integrate_adaptive(flow.vector_field, points[-1], t0, t1, rtol=flow.rtol, atol=flow.atol))
    return torch.stack(points)


def plot_flow(
    flow: ContinuousFlow,
    data: Tensor,
    path: str | os.PathLike | None = None,
    *,
    lim: float = 4.5,
    grid_size: int = 150,
    samples: int = 20000,
    paths: int = 150,
    times: int = 41,
    seed: int = 0,
    title: str | None = None,
) -> Figure:
    """Data samples; the model's density (exact log-likelihood on a grid); model samples
    (``flow(z, reverse=True, logdet=False)``); and a few base-to-data trajectories.

    Arguments:
        flow: A 2-D flow with a standard normal base at ``t = T``; its solver settings are
            used throughout.
        data: Samples of the target, shape ``(N, 2)``.
        path: Where to write the picture (its format by the file's extension, PNG without
            one), atomically (:func:`~pyro_cnf.training.checkpoint.write_atomic`), or ``None``.
        lim: The panels show ``[-lim, lim]^2``.
        grid_size: The density's grid is ``grid_size x grid_size``.
        samples, paths: How many model samples and trajectories to draw.
        times: Points along each trajectory.
        seed: Seeds the base samples.
        title: The figure's title.

    Returns:
        The figure.

    Example:
        >>> from pyro_cnf import ODENet
        >>> fig = plot_flow(ContinuousFlow(ODENet(2, (8,))), torch.randn(100, 2), grid_size=8,
        ...                 samples=100, paths=4, times=3)
        >>> [ax.get_title() for ax in fig.axes]
        ['data', 'model density', 'model samples', 'trajectories (base -> data)']
    """
    like = next(flow.parameters())
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(samples + paths, 2, generator=generator).to(like)
    with torch.no_grad():
        x, _ = flow(z[:samples], reverse=True, logdet=False)
    axis, log_prob = density_grid(flow, lim, grid_size)
    lines = trajectories(flow, z[samples:], times)

    fig = Figure(figsize=(16, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    bins = torch.linspace(-lim, lim, 151).numpy()
    for ax, points, label in ((axes[0], data, "data"), (axes[2], x, "model samples")):
        points = points.detach().cpu().numpy()
        ax.hist2d(points[:, 0], points[:, 1], bins=(bins, bins), cmap="viridis")
        ax.set_title(label)
    extent = (-lim, lim, -lim, lim)
    axes[1].imshow(log_prob.exp().cpu().numpy(), origin="lower", extent=extent, cmap="viridis")
    axes[1].set_title("model density")

    ax = axes[3]
    ax.imshow(log_prob.exp().cpu().numpy(), origin="lower", extent=extent, cmap="Greys", alpha=0.5)
    segments = lines.transpose(0, 1).cpu().numpy()  # (paths, times, 2)
    ax.add_collection(LineCollection(segments, colors="tab:blue", linewidths=0.6, alpha=0.7))
    ax.scatter(segments[:, 0, 0], segments[:, 0, 1], s=6, c="tab:gray", label=f"base, t={flow.T:g}")
    ax.scatter(segments[:, -1, 0], segments[:, -1, 1], s=6, c="tab:red", label="data, t=0")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title("trajectories (base -> data)")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95) if title else None)
    if path is not None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=80)
        write_atomic(path, buffer.getvalue())
    return fig
