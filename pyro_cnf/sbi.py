"""sbi (simulation-based inference) with pyro_cnf density estimators.

Two routes to a posterior estimator that sbi's ``DirectPosterior`` samples and scores:

* :func:`build_cnf_estimator` is a builder in sbi's ``density_estimator=`` form: pass it
  (or a ``functools.partial`` of it) to ``sbi.inference.NPE`` and sbi trains the CNF by
  maximum likelihood in its own loop.
* :func:`flow_matching_estimator` builds the same estimator and trains its field by flow
  matching (:func:`train_flow_matching`): no ODE solve per step, then hand it to
  ``DirectPosterior(estimator, prior)``.

The estimator is built as sbi 0.27's ``build_maf``/``build_nsf`` build theirs: theta is
z-scored by an affine nflows transform ahead of the flow, x by a standardizing module
ahead of the (optional) embedding net, both from the moments of the training batch; the
flow is wrapped in sbi's ``NFlowsFlow``. The nflows ``Flow`` inside is a
:class:`~pyro_cnf.CNFFlow`, so that sbi's posterior sampling (and the rejection
sampling behind its leakage correction) runs the trace-free solve.

sbi is an optional dependency (``pip install -e ".[sbi]"``): ``import pyro_cnf`` never
imports it, and this module imports it only inside the functions that need it.

Example (needs sbi)::

    from functools import partial
    from sbi.inference import NPE, DirectPosterior
    from pyro_cnf.sbi import build_cnf_estimator, flow_matching_estimator

    # (a) sbi trains the CNF by maximum likelihood
    npe = NPE(prior, density_estimator=partial(build_cnf_estimator, rtol=1e-4, atol=1e-4))
    posterior = npe.append_simulations(theta, x).train() and npe.build_posterior()

    # (b) flow matching, then sbi samples and scores
    estimator = flow_matching_estimator(theta, x, max_seconds=30)
    posterior = DirectPosterior(estimator, prior)
    samples = posterior.sample((1000,), x=x_o)
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import CompositeTransform, PointwiseAffineTransform
from torch import Tensor, nn

from .flow import ContinuousFlow, takes_settings
from .nflows import CNFFlow, CNFTransform, forward_without_logdet
from .presets import Preset, get_preset

__all__ = ["Standardize", "build_cnf_estimator", "flow_matching_estimator", "train_flow_matching"]

#: ``z_score_theta`` / ``z_score_x`` options, as in sbi: per-dimension moments, one
#: moment for all dimensions (time series, images), or none.
Z_SCORE = ("independent", "structured", "none", None)


def _moments(batch: Tensor, mode: str, min_std: float) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation for z-scoring, from the batch's finite rows; ``mode``
    ``"structured"`` pools all dimensions (the mean of the per-row standard deviations)."""
    rows = batch.reshape(batch.shape[0], -1)
    rows = batch[torch.isfinite(rows).all(-1)]
    if len(rows) < 2:
        raise ValueError(f"z-scoring needs at least 2 finite rows, got {len(rows)}")
    if mode == "structured":
        mean = rows.mean()
        std = rows.reshape(len(rows), -1).std(dim=1).clamp(min=min_std).mean()
    else:
        mean, std = rows.mean(0), rows.std(0).clamp(min=min_std)
    return mean, std


def _check_z_score(name: str, mode: Any) -> str | None:
    if mode not in Z_SCORE:
        raise ValueError(f"{name} must be one of {list(Z_SCORE)}, got {mode!r}")
    return None if mode == "none" else mode


class Standardize(nn.Module):
    """``(x - mean) / std`` with the moments as buffers (saved with the state dict).

    Example:
        >>> s = Standardize(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
        >>> s(torch.tensor([[3.0, 6.0]]))
        tensor([[1., 1.]])
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).clone())
        self.register_buffer("std", torch.as_tensor(std).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def build_cnf_estimator(
    batch_theta: Tensor,
    batch_x: Tensor,
    z_score_theta: str | None = "independent",
    z_score_x: str | None = "independent",
    hidden_dims: Sequence[int] | None = None,
    embedding_net: nn.Module | None = None,
    *,
    preset: str | Preset | None = None,
    flow: ContinuousFlow | None = None,
    **settings: Any,
):
    """A conditional CNF posterior estimator ``q(theta | x)`` for sbi, built like sbi's own.

    The signature is sbi's ``density_estimator=`` builder: ``NPE(prior,
    density_estimator=build_cnf_estimator)`` calls it with the training ``theta`` and ``x``;
    bind other settings with ``functools.partial``.

    Arguments:
        batch_theta: Parameters, shape ``(N, d)``: the dimension, and the moments when
            z-scoring.
        batch_x: Simulations, shape ``(N, *x_shape)``: the context size (after the
            embedding net), and the moments when z-scoring.
        z_score_theta, z_score_x: ``"independent"`` (per dimension, sbi's default),
            ``"structured"`` (one mean and scale for all dimensions) or ``"none"``. theta
            is z-scored by an nflows ``PointwiseAffineTransform`` ahead of the CNF (its
            log-determinant enters the density), x by a :class:`Standardize` module ahead
            of the embedding net, as sbi's ``build_maf`` does.
        hidden_dims: Hidden widths of the :class:`~pyro_cnf.ODENet` field (the preset's when
            ``None``).
        embedding_net: A module mapping ``x`` to the context, shape ``(N, c)``; trained
            with the flow. Identity when ``None``.
        preset: Where the field and solver settings start (:data:`~pyro_cnf.presets.PRESETS`);
            ``None``: ``"sbi"``, the density field for sbi's maximum-likelihood loop.
        flow: A conditional :class:`~pyro_cnf.ContinuousFlow` to use instead of building one
            (its context size must match).
        **settings: As for :class:`~pyro_cnf.CNFTransform`: field options and flow settings,
            each replacing the preset's.

    Returns:
        sbi's ``NFlowsFlow`` around a :class:`~pyro_cnf.CNFFlow` whose transform is
        ``CompositeTransform([z-score, CNFTransform])``, on ``batch_theta``'s device and in
        its dtype.
    """
    from sbi.neural_nets.estimators import NFlowsFlow

    z_score_theta = _check_z_score("z_score_theta", z_score_theta)
    z_score_x = _check_z_score("z_score_x", z_score_x)
    if not isinstance(batch_theta, Tensor) or batch_theta.dim() != 2:
        got = tuple(batch_theta.shape) if isinstance(batch_theta, Tensor) else type(batch_theta).__name__
        raise ValueError(f"batch_theta must have shape (N, d), got {got}")
    if not isinstance(batch_x, Tensor) or batch_x.dim() < 2 or batch_x.shape[0] != batch_theta.shape[0]:
        got = tuple(batch_x.shape) if isinstance(batch_x, Tensor) else type(batch_x).__name__
        raise ValueError(f"batch_x must have shape ({batch_theta.shape[0]}, ...) like batch_theta, got {got}")
    d = batch_theta.shape[1]
    embedding = nn.Identity() if embedding_net is None else embedding_net
    if z_score_x is not None:
        embedding = nn.Sequential(Standardize(*_moments(batch_x, z_score_x, min_std=1e-7)), embedding)
    with torch.no_grad():
        context = embedding(batch_x[:1])
    if context.dim() != 2:
        raise ValueError(
            f"the embedding net must return a context of shape (N, c), got {tuple(context.shape)} for 1 row"
        )
    cnf = CNFTransform(d, hidden_dims, context_dim=context.shape[1], preset=None if flow else preset or "sbi",
                       flow=flow, **settings)
    parts: list = [cnf]
    if z_score_theta is not None:
        mean, std = _moments(batch_theta, z_score_theta, min_std=1e-14)
        parts.insert(0, PointwiseAffineTransform(shift=-mean / std, scale=1 / std))
    net = CNFFlow(CompositeTransform(parts), StandardNormal([d]), embedding_net=embedding)
    # the estimator follows the data: float64 simulations give a float64 estimator, throughout
    net = net.to(device=batch_theta.device, dtype=batch_theta.dtype)
    return NFlowsFlow(net, input_shape=batch_theta[0].shape, condition_shape=batch_x[0].shape)


def _parts(estimator: Any) -> tuple[Flow, list, CNFTransform]:
    """The nflows flow of ``estimator`` (an ``NFlowsFlow`` or a ``Flow``), the transforms
    ahead of its CNF, and the CNF, which must be the last transform."""
    net = getattr(estimator, "net", estimator)
    if not isinstance(net, Flow):
        raise TypeError(f"expected sbi's NFlowsFlow or an nflows Flow, got {type(estimator).__name__}")
    transform = net._transform
    parts = list(transform._transforms) if isinstance(transform, CompositeTransform) else [transform]
    if not isinstance(parts[-1], CNFTransform):
        raise ValueError(
            "flow matching trains a CNFTransform that maps straight to the base: the flow's last "
            f"transform must be a CNFTransform, got {type(parts[-1]).__name__}"
        )
    if any(isinstance(p, CNFTransform) for p in parts[:-1]):
        raise ValueError("flow matching trains one CNFTransform; this flow has several")
    if not isinstance(net._distribution, StandardNormal):
        raise ValueError(
            f"flow matching transports to a standard normal base, got {type(net._distribution).__name__}"
        )
    return net, parts[:-1], parts[-1]


class _EmbeddedField(nn.Module):
    """The CNF's field seen from the raw simulations: ``f(t, theta, embed(x))``, so that
    :class:`~pyro_cnf.training.FlowMatching` trains the field and the embedding net together."""

    def __init__(self, field: nn.Module, embedding: nn.Module, x_shape: torch.Size) -> None:
        super().__init__()
        self.field, self.embedding, self.x_shape = field, embedding, x_shape
        self.input_dim = getattr(field, "input_dim", None)

    def forward(self, t: Tensor, theta: Tensor, x: Tensor) -> Tensor:
        return self.field(t, theta, self.embedding(x.reshape(-1, *self.x_shape)))


def _objective_options() -> set[str]:
    """The settings of :class:`~pyro_cnf.training.FlowMatching`."""
    from .training import FlowMatching

    return {f.name for f in dataclasses.fields(FlowMatching)}


def train_flow_matching(
    estimator: Any,
    theta: Tensor,
    x: Tensor,
    *,
    steps: int | None = None,
    max_seconds: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    schedule: str | None = None,
    seed: int = 0,
    progress: bool = False,
    preset: str | Preset = "flow_matching",
    **objective: Any,
) -> dict[str, Any]:
    """Train the CNF of an estimator from :func:`build_cnf_estimator` by flow matching,
    with :class:`~pyro_cnf.training.Trainer` and :class:`~pyro_cnf.training.FlowMatching`.

    Rows whose theta or x holds NaN or inf are left out, with a warning that counts them (as
    sbi does with invalid simulations). Each step draws ``batch_size`` rows of ``(theta, x)``
    with replacement, maps theta through the transforms ahead of the CNF (the z-score, held
    fixed) and x through the embedding net (trained with the field), and takes an Adam step
    on the flow-matching loss. No ODE is solved.

    Arguments:
        estimator: sbi's ``NFlowsFlow`` (or an nflows ``Flow``) whose last transform is a
            :class:`~pyro_cnf.CNFTransform` and whose base is ``StandardNormal``.
        theta: Parameters, shape ``(N, d)``.
        x: Simulations, shape ``(N, *x_shape)``.
        steps: Stop after this many steps.
        max_seconds: Stop once the steps have taken this many CPU seconds; give ``steps``,
            ``max_seconds`` or both.
        batch_size: Rows per step (the preset's when ``None``).
        lr: Adam's learning rate (the preset's when ``None``).
        schedule: The Trainer's schedule: ``"cosine"`` decays the learning rate to 0 over
            the budget, ``"constant"`` keeps it (the preset's when ``None``).
        seed: Seeds the minibatches and the flow-matching draws (the global random state is
            left as it was).
        progress: Show a tqdm bar.
        preset: Where ``lr``, ``schedule``, ``batch_size`` and the objective's settings
            start (:data:`~pyro_cnf.presets.PRESETS`).
        **objective: For :class:`~pyro_cnf.training.FlowMatching` (``path``, ``coupling``,
            ``sigma_min``, ``t_power``), each replacing the preset's.

    Returns:
        ``{"steps": n, "cpu_seconds": s, "losses": [...]}`` (one loss per step).

    The estimator is left in eval mode.
    """
    from .training import FlowMatching, Trainer, step_seed

    recipe = get_preset(preset, "train_flow_matching")
    batch_size = recipe.training.get("batch_size") if batch_size is None else batch_size
    if batch_size is None:
        raise ValueError(f"train_flow_matching: preset {recipe.name!r} names no batch_size; pass batch_size=")
    lr = recipe.lr if lr is None else lr
    schedule = recipe.schedule if schedule is None else schedule
    objective = {**{k: v for k, v in recipe.training.items() if k in _objective_options()}, **objective}

    if theta.dim() != 2 or x.dim() < 2 or len(theta) != len(x) or len(theta) == 0:
        raise ValueError(
            f"theta must have shape (N, d) and x (N, ...), got {tuple(theta.shape)} and {tuple(x.shape)}"
        )
    finite = torch.isfinite(theta).all(-1) & torch.isfinite(x.reshape(len(x), -1)).all(-1)
    if not finite.all():  # as sbi does with invalid simulations: leave them out, and say so
        bad = (~finite).nonzero().flatten().tolist()
        if len(bad) == len(theta):
            raise ValueError("train_flow_matching: every row of theta or x holds NaN or inf")
        warnings.warn(f"train_flow_matching: leaving out {len(bad)} of {len(theta)} rows whose theta or x holds "
                      f"NaN or inf (rows {bad[:5]}{' ...' if len(bad) > 5 else ''})", stacklevel=2)
        theta, x = theta[finite], x[finite]
    net, before, cnf = _parts(estimator)
    with torch.no_grad():
        theta_in = forward_without_logdet(CompositeTransform(before), theta) if before else theta
    field = _EmbeddedField(cnf.flow.vector_field, net._embedding_net, x.shape[1:])
    rows_x = x.reshape(len(x), -1)  # the trainer takes 2-D rows; the field restores x's shape

    def batches(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(step_seed(seed, step))
        rows = torch.randint(len(theta), (batch_size,), generator=g).to(theta.device)
        return theta_in[rows], rows_x[rows]

    trainer = Trainer(ContinuousFlow(field, T=cnf.flow.T), batches, FlowMatching(**objective), lr=lr,
                      schedule=schedule, desc="flow matching", disable=not progress)
    with torch.random.fork_rng(devices=[theta.device] if theta.device.type == "cuda" else []):
        torch.manual_seed(seed)
        history = trainer.fit(steps, cpu_seconds=max_seconds)
    (estimator if isinstance(estimator, nn.Module) else net).eval()
    return {"steps": trainer.step, "cpu_seconds": trainer.cpu_seconds, "losses": [h["loss"] for h in history]}


@takes_settings
def flow_matching_estimator(
    theta: Tensor,
    x: Tensor,
    *,
    hidden_dims: Sequence[int] | None = None,
    z_score_theta: str | None = "independent",
    z_score_x: str | None = "independent",
    embedding_net: nn.Module | None = None,
    preset: str | Preset = "flow_matching",
    **settings: Any,
):
    """:func:`build_cnf_estimator` from the ``"flow_matching"`` preset, trained by
    :func:`train_flow_matching` with that preset's recipe.

    ``settings`` are of three kinds, each replacing the preset's value: field options and
    flow settings build the estimator (its :class:`~pyro_cnf.ContinuousFlow` is what sbi's
    sampling and ``log_prob`` solve with); :func:`train_flow_matching`'s own (``steps`` or
    ``max_seconds``, one of them required, ``batch_size``, ``lr``, ``schedule``, ``seed``,
    ``progress``) and :class:`~pyro_cnf.training.FlowMatching`'s (``path``, ``coupling``,
    ``sigma_min``, ``t_power``) go to the training. The training record is left in
    ``estimator.training_record``.
    """
    training_options = set(inspect.signature(train_flow_matching).parameters) - {"estimator", "theta", "x", "preset"}
    training = {k: settings.pop(k) for k in list(settings) if k in training_options | _objective_options()}
    estimator = build_cnf_estimator(theta, x, z_score_theta, z_score_x, hidden_dims, embedding_net,
                                    preset=preset, **settings)
    estimator.training_record = train_flow_matching(estimator, theta, x, preset=preset, **training)
    return estimator
