"""What a training step minimises: small objective objects for :class:`~pyro_cnf.training.Trainer`.

- :class:`MaximumLikelihood`: the negative log-likelihood of the batch under any model with
  ``log_prob(x[, context])`` (a :class:`~pyro_cnf.ContinuousFlow`, an nflows ``Flow``, a
  module around a Pyro distribution), plus RNODE's penalties for a ``ContinuousFlow`` built
  with ``regularize=True``.
- :class:`FlowMatching`: :func:`~pyro_cnf.flow_matching.flow_matching_loss` of a
  ``ContinuousFlow``'s vector field, with its path, coupling and time options; no ODE solve.

An objective checks once, in :meth:`Objective.metrics`, that it can train a model, and names
the metrics its :meth:`Objective.loss` reports. Randomness: :meth:`Objective.draw` draws what
a step needs for the whole (global) batch before the trainer slices it over data-parallel
ranks, so that ``N`` ranks see what one process sees; :attr:`Objective.draws_in_loss` says
whether :meth:`Objective.loss` itself draws per row (the probes of a stochastic trace), which
the trainer then draws from each rank's own stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import ContinuousFlow, standard_normal_log_prob
from ..flow_matching import COUPLINGS, PATHS, flow_matching_loss, minibatch_ot_pairing

__all__ = ["Objective", "MaximumLikelihood", "FlowMatching"]


class Objective:
    """The loss of one training step. Subclasses define :meth:`metrics` and :meth:`loss`."""

    #: Whether :meth:`loss` draws random numbers for its rows (e.g. Hutchinson probes).
    draws_in_loss: bool = True

    def metrics(self, model: nn.Module) -> tuple[str, ...]:
        """Check that this objective can train ``model``; the names of the metrics that
        :meth:`loss` reports, ``"loss"`` first. Raises ``TypeError`` or ``ValueError``."""
        raise NotImplementedError

    def draw(self, model: nn.Module, x: Tensor, context: Tensor | None) -> tuple[Tensor | None, ...]:
        """The step's inputs for the whole batch ``x`` (shape ``(B, d)``) and ``context``
        (``(B, c)`` or ``None``): ``(x, context, *drawn)``, every tensor with ``B`` rows."""
        return x, context

    def loss(
        self, model: nn.Module, x: Tensor, context: Tensor | None, *drawn: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of a batch (a 0-d tensor to minimise) and the metrics named by
        :meth:`metrics`, 0-d tensors."""
        raise NotImplementedError


def _check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class MaximumLikelihood(Objective):
    """Minimise ``-log p(x | context)`` averaged over the batch, plus RNODE's penalties
    ``lambda_kinetic * kinetic + lambda_jacobian * jacobian`` (batch means of the integrals
    of a ``ContinuousFlow(..., regularize=True)``) when either weight is non-zero.

    The model is anything with ``log_prob(x)`` (and ``log_prob(x, context)`` for
    conditional data) returning shape ``(B,)``. A :class:`~pyro_cnf.ContinuousFlow` is
    solved once per step with ``return_stats=True``, so that its NFE joins the metrics.

    Metrics: ``loss``, ``nll``; ``nfe`` for a ``ContinuousFlow``; ``kinetic`` and
    ``jacobian`` with the penalty.

    Example:
        >>> from pyro_cnf import ContinuousFlow, ODENet
        >>> MaximumLikelihood().metrics(ContinuousFlow(ODENet(2)))
        ('loss', 'nll', 'nfe')
        >>> MaximumLikelihood(lambda_kinetic=0.1).metrics(ContinuousFlow(ODENet(2), regularize=True))
        ('loss', 'nll', 'nfe', 'kinetic', 'jacobian')
    """

    lambda_kinetic: float = 0.0
    lambda_jacobian: float = 0.0

    def __post_init__(self) -> None:
        _check_weight("lambda_kinetic", self.lambda_kinetic)
        _check_weight("lambda_jacobian", self.lambda_jacobian)

    @property
    def penalised(self) -> bool:
        return bool(self.lambda_kinetic or self.lambda_jacobian)

    def metrics(self, model: nn.Module) -> tuple[str, ...]:
        if not callable(getattr(model, "log_prob", None)):
            raise TypeError(f"maximum likelihood needs a model with log_prob(x[, context]), got {type(model).__name__}")
        flow = isinstance(model, ContinuousFlow)
        if self.penalised and not (flow and model.regularize):
            raise ValueError(
                "the RNODE penalty needs a ContinuousFlow built with regularize=True, got "
                + (f"regularize={model.regularize}" if flow else type(model).__name__)
            )
        return ("loss", "nll") + (("nfe",) if flow else ()) + (("kinetic", "jacobian") if self.penalised else ())

    def loss(
        self, model: nn.Module, x: Tensor, context: Tensor | None, *drawn: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(model, ContinuousFlow):
            log_prob = model.log_prob(x) if context is None else model.log_prob(x, context)
            if not isinstance(log_prob, Tensor) or log_prob.shape != x.shape[:1]:
                got = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob).__name__
                name, n = type(model).__name__, len(x)
                raise ValueError(f"{name}.log_prob returned {got} for {n} rows; expected ({n},)")
            nll = -log_prob.mean()
            return nll, {"loss": nll, "nll": nll}
        z, ladj, stats = model(x, context, return_stats=True)
        nll = -(standard_normal_log_prob(z) + ladj).mean()
        metrics = {"loss": nll, "nll": nll, "nfe": nll.new_tensor(float(stats.nfe))}
        if self.penalised:
            kinetic, jacobian = stats.kinetic_energy.mean(), stats.jacobian_norm.mean()
            metrics.update(kinetic=kinetic, jacobian=jacobian)
            metrics["loss"] = nll + self.lambda_kinetic * kinetic + self.lambda_jacobian * jacobian
        return metrics["loss"], metrics


@dataclass(frozen=True)
class FlowMatching(Objective):
    """Regress a :class:`~pyro_cnf.ContinuousFlow`'s vector field on a conditional path
    (:func:`~pyro_cnf.flow_matching.flow_matching_loss`); no ODE solve while training.

    Arguments:
        path: A name in :data:`~pyro_cnf.flow_matching.PATHS` (``"ot"`` or ``"cosine"``).
        coupling: A name in :data:`~pyro_cnf.flow_matching.COUPLINGS`. ``"minibatch_ot"``
            pairs data and base samples over the whole batch, before a data-parallel run
            slices it.
        sigma_min: The path's noise scale at ``t = 0``, in ``[0, 1)``.
        t_power: Times are drawn as ``T * u ** t_power`` with ``u ~ U(0, 1)``: ``1`` is
            uniform, ``> 1`` puts more of them near the data.

    Metrics: ``loss``.

    Example:
        >>> from pyro_cnf import ContinuousFlow, ODENet
        >>> flow = ContinuousFlow(ODENet(2, (8,)))
        >>> objective = FlowMatching(path="cosine")
        >>> loss, metrics = objective.loss(flow, *objective.draw(flow, torch.randn(16, 2), None))
        >>> loss.shape, list(metrics)
        (torch.Size([]), ['loss'])
    """

    path: str = "ot"
    coupling: str = "independent"
    sigma_min: float = 1e-4
    t_power: float = 1.0

    #: every random number of a step is drawn by :meth:`draw`, for the whole batch
    draws_in_loss = False

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {sorted(PATHS)}, got {self.path!r}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {list(COUPLINGS)}, got {self.coupling!r}")
        if not (isinstance(self.sigma_min, (int, float)) and 0 <= self.sigma_min < 1):
            raise ValueError(f"sigma_min must be in [0, 1), got {self.sigma_min!r}")
        if not (isinstance(self.t_power, (int, float)) and math.isfinite(self.t_power) and self.t_power > 0):
            raise ValueError(f"t_power must be a finite number > 0, got {self.t_power!r}")

    def metrics(self, model: nn.Module) -> tuple[str, ...]:
        if not isinstance(model, ContinuousFlow):
            raise TypeError(f"flow matching trains the vector field of a ContinuousFlow, got {type(model).__name__}")
        return ("loss",)

    def draw(self, model: Any, x: Tensor, context: Tensor | None) -> tuple[Tensor | None, ...]:
        # the order of the draws (t, then the base samples) is flow_matching_loss's own
        n, d = x.shape
        u = torch.rand(n, 1, dtype=x.dtype, device=x.device)
        t = model.T * (u if self.t_power == 1 else u.pow(self.t_power))
        noise = torch.randn(n, d, dtype=x.dtype, device=x.device)
        if self.coupling == "minibatch_ot":
            noise = noise[minibatch_ot_pairing(x, noise, context)]
        return x, context, t, noise

    def loss(
        self, model: nn.Module, x: Tensor, context: Tensor | None, *drawn: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        t, noise = drawn
        # the pairs are already coupled by draw(), over the whole batch
        loss = flow_matching_loss(
            model.vector_field, x, context=context, path=self.path, sigma_min=self.sigma_min, T=model.T, t=t,
            noise=noise,
        )
        return loss, {"loss": loss}
