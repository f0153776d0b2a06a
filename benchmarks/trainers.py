"""Density training runs under an equal CPU budget, and the one exact evaluator they are
all scored by (W2, W4).

Each run builds a model, then takes Adam steps on fresh minibatches until its process
CPU time reaches the budget. CNF runs are scored by :func:`exact_nll`: their trained field
integrated by ``pyro_cnf.ContinuousFlow`` with the exact trace at rtol = atol = 1e-6, so
that every CNF is judged by the same solver and no run profits from a loose tolerance or
a noisy trace. MAF is exact by construction and scored by its own ``log_prob``.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field as dc_field

import torch
from torch import Tensor, nn

import pyro_cnf
from common import normal_log_prob
from peers import TimeInjected

#: Run names and what they train; see :func:`build`.
RUNS = {
    "pyro_cnf_dopri5": "pyro_cnf MLE, dopri5 rtol=atol=1e-5, closed-form exact trace",
    "pyro_cnf_rk4": "pyro_cnf MLE, rk4 with 8 steps, closed-form exact trace",
    "pyro_cnf_rk4_rnode": "pyro_cnf MLE, rk4 with 8 steps + RNODE (lambda_k = lambda_j = 0.01)",
    "pyro_cnf_fm": "pyro_cnf flow matching (OT path), then the exact CNF likelihood",
    "pyro_cnf_hutch": "pyro_cnf MLE, dopri5 rtol=atol=1e-5, Hutchinson trace (Rademacher)",
    "zuko": "zuko.flows.CNF (its MLP 64x64 ELU), dopri5 atol=rtol=1e-5, its exact trace (d <= 8) or Hutchinson",
    "torchdyn": "torchdyn CNF + NeuralODE (dopri5 1e-5, autograd), same ODENet field, exact trace",
    "maf": "nflows MaskedAutoregressiveFlow, 5 layers, hidden 64",
}
EVAL_TOL = 1e-6
#: The NFE of a trained field is measured with this adaptive solve (exact trace).
NFE_TOL = 1e-5


@dataclass
class Model:
    """What a run trains: ``loss(x)`` for a step, ``field`` (CNFs) or ``log_prob`` (MAF)
    for the evaluation, and the NFE of the last training solve."""

    params: list[nn.Parameter]
    loss: Callable[[Tensor], Tensor]
    field: nn.Module | None = None
    log_prob: Callable[[Tensor], Tensor] | None = None
    train_nfe: Callable[[], int] = lambda: 0


@dataclass
class RunResult:
    run: str
    steps: int = 0
    cpu_s: float = 0.0
    nll: float = math.nan
    nfe_start: int = 0
    nfe_end: int = 0
    train_nfe_start: int = 0
    train_nfe_end: int = 0
    failed: str = ""
    curve: list = dc_field(default_factory=list)


class ZukoField(nn.Module):
    """zuko's CNF field ``f(t, x)`` as a module, for the common evaluator."""

    def __init__(self, ffj: nn.Module, d: int) -> None:
        super().__init__()
        self.ffj, self.input_dim, self.context_dim = ffj, d, 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.ffj.f(t, x)


def build(run: str, d: int, hidden: tuple[int, ...] = (64, 64)) -> Model:
    """A fresh model for ``run`` (a key of :data:`RUNS`) on ``d``-dimensional data."""
    if run.startswith("pyro_cnf"):
        net = pyro_cnf.ODENet(d, hidden)
        if run == "pyro_cnf_fm":
            from pyro_cnf.flow_matching import flow_matching_loss

            return Model(list(net.parameters()), lambda x: flow_matching_loss(net, x), field=net)
        kw = dict(method="rk4", steps=8) if run.startswith("pyro_cnf_rk4") else dict(rtol=1e-5, atol=1e-5)
        regularize = run == "pyro_cnf_rk4_rnode"
        flow = pyro_cnf.ContinuousFlow(net, trace="hutchinson" if run == "pyro_cnf_hutch" else "exact",
                                       regularize=regularize, **kw)

        def loss(x: Tensor) -> Tensor:
            z, ladj = flow(x)
            nll = -(normal_log_prob(z) + ladj).mean()
            if regularize:
                nll = nll + 0.01 * flow.kinetic_energy.mean() + 0.01 * flow.jacobian_norm.mean()
            return nll

        return Model(list(net.parameters()), loss, field=net, train_nfe=lambda: flow.nfe)
    if run == "zuko":
        import zuko

        flow = zuko.flows.CNF(d, hidden_features=hidden, atol=1e-5, rtol=1e-5, exact=d <= 8)
        calls = [0]
        flow.transform.ode.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

        def loss(x: Tensor) -> Tensor:
            calls[0] = 0
            return -flow().log_prob(x).mean()

        return Model(list(flow.parameters()), loss, field=ZukoField(flow.transform, d), train_nfe=lambda: calls[0])
    if run == "torchdyn":
        from torchdyn.core import NeuralODE
        from torchdyn.models.cnf import CNF, autograd_trace

        net = pyro_cnf.ODENet(d, hidden)
        with contextlib.redirect_stdout(io.StringIO()):
            node = NeuralODE(CNF(TimeInjected(net), trace_estimator=autograd_trace), solver="dopri5",
                             sensitivity="autograd", atol=1e-5, rtol=1e-5, return_t_eval=False)
        t_span = torch.tensor([0.0, 1.0])

        def loss(x: Tensor) -> Tensor:
            node.vf.nfe = 0
            sol = node(torch.cat([x.new_zeros(x.shape[0], 1), x], 1), t_span)[-1]
            return -(normal_log_prob(sol[:, 1:]) - sol[:, 0]).mean()

        return Model(list(net.parameters()), loss, field=net, train_nfe=lambda: int(node.vf.nfe))
    if run == "maf":
        from nflows.flows import MaskedAutoregressiveFlow

        maf = MaskedAutoregressiveFlow(features=d, hidden_features=hidden[0], num_layers=5, num_blocks_per_layer=2)
        return Model(list(maf.parameters()), lambda x: -maf.log_prob(x).mean(), log_prob=maf.log_prob)
    raise ValueError(f"unknown run {run!r}; expected one of {sorted(RUNS)}")


def exact_log_prob(field: nn.Module, x: Tensor, tol: float = EVAL_TOL, chunk: int = 4096) -> Tensor:
    """log p(x) of a trained field: exact trace (closed form when the field has one,
    else d VJPs), dopri5 at rtol = atol = ``tol``."""
    flow = pyro_cnf.ContinuousFlow(field, trace="exact", rtol=tol, atol=tol, options={"max_num_steps": 20_000})
    out = []
    with torch.no_grad():
        for rows in x.split(chunk):
            z, ladj = flow(rows)
            out.append(normal_log_prob(z) + ladj)
    return torch.cat(out)


def field_nfe(field: nn.Module, x: Tensor) -> int:
    """Forward NFE of one exact-trace dopri5 solve at :data:`NFE_TOL`: the cost of the
    learned dynamics, measured alike for every run."""
    flow = pyro_cnf.ContinuousFlow(field, trace="exact", rtol=NFE_TOL, atol=NFE_TOL, options={"max_num_steps": 20_000})
    with torch.no_grad():
        flow(x)
    return flow.nfe


def train(run: str, d: int, next_batch: Callable[[int], Tensor], budget: float, test: Tensor,
          nfe_batch: Tensor, lr: float = 2e-3, seed: int = 0, log=print, evaluate: bool = True) -> RunResult:
    """Train ``run`` for ``budget`` CPU seconds on ``next_batch(step)``; score it on ``test``."""
    torch.manual_seed(seed)
    model = build(run, d)
    result = RunResult(run)
    optimizer = torch.optim.Adam(model.params, lr=lr)
    if model.field is not None:
        result.nfe_start = field_nfe(model.field, nfe_batch)
    spent, last_report = 0.0, 0.0
    while spent < budget:
        x = next_batch(result.steps)
        start = time.process_time()
        try:
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(x)
            loss.backward()
            optimizer.step()
        except (pyro_cnf.SolverError, AssertionError) as error:  # zuko/torchdyn assert too
            result.failed = f"step {result.steps}: {str(error)[:120]}"
            log(f"    {run}: training stopped, {result.failed}")
            break
        spent += time.process_time() - start
        if result.steps == 0:
            result.train_nfe_start = model.train_nfe()
        result.steps += 1
        result.train_nfe_end = model.train_nfe()
        if spent - last_report >= budget / 4 or spent >= budget:
            last_report = spent
            result.curve.append((round(spent, 1), result.steps, loss.item()))
            log(f"    {run}: {spent:6.1f} s  step {result.steps:5d}  loss {loss.item():.3f}  train NFE {result.train_nfe_end}")
    result.cpu_s = spent
    if model.field is not None:
        model.field.eval()
        result.nfe_end = field_nfe(model.field, nfe_batch)
    if evaluate:
        with torch.no_grad():
            if model.field is not None:
                logp = exact_log_prob(model.field, test)
            else:
                logp = torch.cat([model.log_prob(rows) for rows in test.split(4096)])
        result.nll = -logp.double().mean().item()
    return result
