"""Training loops: a progress bar, maximum likelihood on a tensor of data, held-out NLL.

:func:`progress_loop`, :func:`fit_density` and :func:`nll` are the small shared helpers
the examples use; :class:`Trainer` is the demo's resumable trainer of a
:class:`~pyro_cnf.ContinuousFlow` density (maximum likelihood, optionally RNODE-regularised,
or flow matching) with atomic checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["progress_loop", "fit_density", "nll"]

LogProb = Callable[[Tensor, "Tensor | None"], Tensor]


def progress_loop(
    step: Callable[[int], Mapping[str, float]],
    steps: int,
    *,
    start: int = 0,
    desc: str = "",
    disable: bool | None = None,
) -> list[dict[str, float]]:
    """Run ``step(i)`` for ``i`` in ``range(start, steps)`` under one tqdm bar.

    The bar shows the metrics ``step`` returns (e.g. loss, nfe) next to tqdm's it/s.

    Arguments:
        step: Called with the step index; returns a mapping of metric name to number.
        steps: One past the last index (the total, not the number still to run).
        start: The first index, e.g. the step a checkpoint stopped at.
        desc: The bar's label.
        disable: Hide the bar; ``None`` hides it when the output is not a terminal.

    Returns:
        The metrics of every step run, in order (``steps - start`` dicts of floats).

    Example:
        >>> progress_loop(lambda i: {"square": i * i}, 4, start=2, disable=True)
        [{'square': 4.0}, {'square': 9.0}]
    """
    if steps < start:
        raise ValueError(f"steps must be >= start, got steps={steps}, start={start}")
    history = []
    with tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=disable) as bar:
        for i in bar:
            metrics = {k: float(v) for k, v in step(i).items()}
            history.append(metrics)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    return history


def fit_density(
    log_prob: LogProb,
    parameters: Iterable[torch.nn.Parameter],
    data: Tensor,
    *,
    context: Tensor | None = None,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str = "fit",
    penalty: Callable[[], Tensor] | None = None,
) -> list[dict[str, float]]:
    """Maximum likelihood with Adam on random minibatches.

    Each step draws ``batch_size`` rows without replacement (all rows when fewer) and
    minimises ``-log_prob(x_batch, c_batch).mean()`` plus ``penalty()``, which is called
    after ``log_prob`` so that it can read what that call left behind (e.g. a flow's RNODE
    integrals).

    Arguments:
        log_prob: ``(x, context or None) -> log density``, shapes ``(B, d), (B, c)`` to ``(B,)``.
        parameters: What Adam updates.
        data: Shape ``(N, d)``.
        context: Shape ``(N, c)``, batched with ``data`` row by row.
        steps: The number of optimiser steps.
        batch_size: Rows per step.
        lr, weight_decay: Adam's settings.
        seed: Seeds the minibatch draws (not the model's own randomness).
        desc: The progress bar's label.
        penalty: Adds a regulariser to the loss.

    Returns:
        Per step ``{"loss", "nll"}`` (and ``"penalty"`` when given).

    Example:
        >>> mu = torch.nn.Parameter(torch.zeros(2))
        >>> normal = lambda x, c: torch.distributions.Normal(mu, 1.0).log_prob(x).sum(-1)
        >>> history = fit_density(normal, [mu], torch.randn(500, 2) + 3.0, steps=300, lr=0.05, desc="")
        >>> torch.allclose(mu.detach(), torch.full((2,), 3.0), atol=0.2)
        True
    """
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] == 0:
        got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (N >= 1, d), got {got}")
    if context is not None and (not isinstance(context, Tensor) or context.shape[0] != data.shape[0]):
        got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"context must be a tensor with one row per data row ({data.shape[0]}), got {got}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"expected steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = data.shape[0]

    def step(i: int) -> dict[str, float]:
        rows = torch.randperm(n, generator=generator)[:batch_size].to(data.device)
        optimizer.zero_grad(set_to_none=True)
        nll_batch = -log_prob(data[rows], None if context is None else context[rows]).mean()
        metrics = {"loss": nll_batch.item(), "nll": nll_batch.item()}
        loss = nll_batch
        if penalty is not None:
            extra = penalty()
            loss = loss + extra
            metrics.update(loss=loss.item(), penalty=extra.item())
        loss.backward()
        optimizer.step()
        return metrics

    return progress_loop(step, steps, desc=desc)


def nll(log_prob: LogProb, data: Tensor, context: Tensor | None = None, batch_size: int = 4096) -> float:
    """Mean negative log-likelihood of ``data`` (shape ``(N, d)``) under ``torch.no_grad()``,
    ``batch_size`` rows at a time.

    Example:
        >>> normal = lambda x, c: torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
        >>> round(nll(normal, torch.zeros(10, 2), batch_size=3), 4)  # log(2 pi)
        1.8379
    """
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] == 0:
        got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (N >= 1, d), got {got}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = 0.0
    with torch.no_grad():
        for start in range(0, data.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            total -= log_prob(data[rows], None if context is None else context[rows]).double().sum().item()
    return total / data.shape[0]
