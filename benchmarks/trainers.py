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
import copy
import io
import math
import re
import time
from collections.abc import Callable, Sequence
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
    "pyro_cnf_dopri5_rnode": "pyro_cnf MLE, dopri5 rtol=atol=1e-5 + RNODE (lambda_k = lambda_j = 0.05; "
                             "`pyro_cnf_dopri5_rnode@L` sets both to L)",
    "pyro_cnf_fm": "pyro_cnf flow matching with the tuned recipe of trainers.FM_RECIPE (ODENet 4x64 silu, "
                   "time_gate_scale 10, cosine path, independent coupling, 2 minibatches per step, Adam lr 2e-2 "
                   "with cosine decay to 0 over the budget; digits: 2x256, lr 5e-3), then the exact CNF likelihood",
    "pyro_cnf_dopri5x3": "pyro_cnf MLE, dopri5 on a fixed grid of 3 steps (19 NFE), closed-form exact trace",
    "pyro_cnf_dopri5x2": "pyro_cnf MLE, dopri5 on a fixed grid of 2 steps (13 NFE), closed-form exact trace",
    "pyro_cnf_dopri5x2_rnode": "pyro_cnf MLE, dopri5 on a fixed grid of 2 steps (13 NFE) + RNODE (lambda_k = "
                               "lambda_j = 0.05), closed-form exact trace",
    "pyro_cnf_hutch": "pyro_cnf MLE, dopri5 rtol=atol=1e-5, Hutchinson trace (Rademacher)",
    "zuko": "zuko.flows.CNF (its MLP 64x64 ELU), dopri5 atol=rtol=1e-5, its exact trace (d <= 8) or Hutchinson",
    "torchdyn": "torchdyn CNF + NeuralODE (dopri5 1e-5, autograd), same ODENet field, exact trace",
    "maf": "nflows MaskedAutoregressiveFlow, 5 layers, hidden 64",
}
EVAL_TOL = 1e-6
#: The ``pyro_cnf_fm`` run: ODENet options, optimiser and flow-matching loss options.
#: ``lr`` replaces the shared learning rate; ``schedule`` "cosine" decays it to 0 over the
#: CPU budget (``lr * (1 + cos(pi * spent / budget)) / 2``), "constant" keeps it;
#: ``batches`` draws that many minibatches per step (a batch of ``batches * BATCH``);
#: ``ema`` > 0 evaluates an exponential moving average of the weights with that decay;
#: ``t_power`` draws the times as ``T * u ** t_power``, ``u ~ U(0, 1)`` (> 1: more near the data).
FM_RECIPE = dict(activation="silu", time_gate_scale=10.0, hidden=(64, 64, 64, 64), lr=2e-2, schedule="cosine",
                 batches=2, coupling="independent", sigma_min=1e-4, path="cosine", ema=0.0, t_power=1.0)
#: The NFE of a trained field is measured with this adaptive solve (exact trace).
NFE_TOL = 1e-5


@dataclass
class Model:
    """What a run trains: ``loss(x)`` for a step, ``field`` (CNFs) or ``log_prob`` (MAF)
    for the evaluation, and the NFE of the last training solve. ``lr`` (None: the shared
    one), ``schedule`` (fraction of the budget spent -> factor on ``lr``) and ``batches``
    (minibatches per step) let a run keep its own optimiser settings; ``after_step`` runs
    after every optimiser step (an EMA update) and ``eval_field`` gives the field to score."""

    params: list[nn.Parameter]
    loss: Callable[[Tensor], Tensor]
    field: nn.Module | None = None
    log_prob: Callable[[Tensor], Tensor] | None = None
    train_nfe: Callable[[], int] = lambda: 0
    lr: float | None = None
    schedule: Callable[[float], float] | None = None
    batches: int = 1
    after_step: Callable[[], None] | None = None
    eval_field: Callable[[], nn.Module] | None = None
    #: log p(x) by the run's own training solver (exact trace): a flow trained on a coarse
    #: grid is only worth its NFE if this agrees with the exact evaluator.
    own_log_prob: Callable[[Tensor], Tensor] | None = None

    def scored_field(self) -> nn.Module | None:
        return self.eval_field() if self.eval_field is not None else self.field


@dataclass
class RunResult:
    run: str
    steps: int = 0
    cpu_s: float = 0.0
    nll: float = math.nan
    nfe_start: int = 0
    nfe_end: int = 0
    #: Held-out NLL by the run's own training solver (pyro_cnf exact-trace runs).
    nll_own: float = math.nan
    train_nfe_start: int = 0
    train_nfe_end: int = 0
    failed: str = ""
    curve: list = dc_field(default_factory=list)
    #: ``(CPU s, steps, held-out NLL on the first n_curve test points)`` at checkpoints
    #: whose evaluation time is not counted in the budget.
    nll_curve: list = dc_field(default_factory=list)
    #: The final NLL on those same first ``n_curve`` test points.
    nll_subset: float = math.nan
    n_curve: int = 0


class ZukoField(nn.Module):
    """zuko's CNF field ``f(t, x)`` as a module, for the common evaluator."""

    def __init__(self, ffj: nn.Module, d: int) -> None:
        super().__init__()
        self.ffj, self.input_dim, self.context_dim = ffj, d, 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.ffj.f(t, x)


def cosine_decay(fraction: float) -> float:
    """The factor on the learning rate once ``fraction`` of the budget is spent: 1 -> 0."""
    return 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


def build_fm(d: int, hidden: tuple[int, ...] = (64, 64), recipe: dict | None = None) -> Model:
    """The flow-matching run of :data:`FM_RECIPE`, with ``recipe``'s entries replacing its own."""
    from pyro_cnf.flow_matching import flow_matching_loss

    r = {**FM_RECIPE, **(recipe or {})}
    unknown = set(r) - set(FM_RECIPE)
    if unknown:
        raise ValueError(f"unknown flow-matching options {sorted(unknown)}; expected some of {sorted(FM_RECIPE)}")
    net = pyro_cnf.ODENet(d, tuple(r["hidden"] or hidden), activation=r["activation"],
                          time_gate_scale=r["time_gate_scale"])
    schedules = {"cosine": cosine_decay, "constant": None}

    def loss(x: Tensor) -> Tensor:
        t = None if r["t_power"] == 1 else torch.rand(x.shape[0], 1, dtype=x.dtype).pow(r["t_power"])
        return flow_matching_loss(net, x, t=t, coupling=r["coupling"], sigma_min=r["sigma_min"], path=r["path"])

    model = Model(list(net.parameters()), loss, field=net, lr=r["lr"], schedule=schedules[r["schedule"]],
                  batches=int(r["batches"]))
    if r["ema"]:
        average = copy.deepcopy(net).requires_grad_(False)
        live, kept = list(net.parameters()), list(average.parameters())

        def after_step() -> None:
            with torch.no_grad():
                torch._foreach_lerp_(kept, live, 1 - r["ema"])

        model.after_step, model.eval_field = after_step, lambda: average
    return model


def build(run: str, d: int, hidden: tuple[int, ...] = (64, 64), recipe: dict | None = None) -> Model:
    """A fresh model for ``run`` (a key of :data:`RUNS`) on ``d``-dimensional data;
    ``recipe`` overrides entries of :data:`FM_RECIPE` for ``pyro_cnf_fm``."""
    if run == "pyro_cnf_fm":
        return build_fm(d, hidden, recipe)
    run, _, lam_text = run.partition("@")  # pyro_cnf_dopri5_rnode@0.1: RNODE weight 0.1
    if lam_text and not run.endswith("_rnode"):
        raise ValueError(f"a weight @{lam_text} applies to the *_rnode runs only, not {run!r}")
    if run.startswith("pyro_cnf") and run in RUNS:
        net = pyro_cnf.ODENet(d, hidden)
        grid = re.match(r"pyro_cnf_dopri5x(\d+)", run)
        kw = (dict(method="rk4", steps=8) if run.startswith("pyro_cnf_rk4") else dict(steps=int(grid[1]))
              if grid else dict(rtol=1e-5, atol=1e-5))
        regularize = run.endswith("_rnode")
        lam = float(lam_text) if lam_text else 0.01 if run == "pyro_cnf_rk4_rnode" else 0.05
        trace = "hutchinson" if run == "pyro_cnf_hutch" else "exact"
        flow = pyro_cnf.ContinuousFlow(net, trace=trace, regularize=regularize, **kw)
        own = pyro_cnf.ContinuousFlow(net, trace="exact", **kw)  # the same solver, no penalty integrals

        def loss(x: Tensor) -> Tensor:
            z, ladj, stats = flow(x, return_stats=True)
            nll = -(normal_log_prob(z) + ladj).mean()
            if regularize:
                nll = nll + lam * (stats.kinetic_energy.mean() + stats.jacobian_norm.mean())
            return nll

        def own_log_prob(x: Tensor) -> Tensor:
            z, ladj = own(x)
            return normal_log_prob(z) + ladj

        return Model(list(net.parameters()), loss, field=net, train_nfe=lambda: flow.nfe,
                     own_log_prob=None if trace == "hutchinson" else own_log_prob)
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
          nfe_batch: Tensor, lr: float = 2e-3, seed: int = 0, log=print, evaluate: bool = True,
          curve_at: Sequence[float] = (), n_curve: int = 2000, recipe: dict | None = None,
          keep: dict | None = None) -> RunResult:
    """Train ``run`` for ``budget`` CPU seconds on ``next_batch(step)``; score it on ``test``.

    ``curve_at``: CPU seconds at which the held-out NLL of the first ``n_curve`` test
    points is recorded in ``result.nll_curve`` (exact evaluator; the evaluation's own time
    is not counted in the budget). ``keep``, a dict, receives the trained ``model``."""
    torch.manual_seed(seed)
    model = build(run, d, recipe=recipe)
    result = RunResult(run)
    base_lr = model.lr if model.lr is not None else lr
    optimizer = torch.optim.Adam(model.params, lr=base_lr)
    if model.field is not None:
        result.nfe_start = field_nfe(model.field, nfe_batch)
    checkpoints = sorted(c for c in curve_at if 0 < c < budget) if model.field is not None else []
    result.n_curve = min(n_curve, len(test)) if checkpoints else 0

    def record_curve() -> None:
        nll = -exact_log_prob(model.scored_field(), test[: result.n_curve]).double().mean().item()
        result.nll_curve.append((round(spent, 2), result.steps, nll))

    spent, last_report = 0.0, 0.0
    while spent < budget:
        k = model.batches
        x = next_batch(result.steps) if k == 1 else torch.cat([next_batch(result.steps * k + j) for j in range(k)])
        start = time.process_time()
        try:
            if model.schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = base_lr * model.schedule(spent / budget)
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(x)
            loss.backward()
            optimizer.step()
            if model.after_step is not None:
                model.after_step()
        except (pyro_cnf.SolverError, AssertionError) as error:  # zuko/torchdyn assert too
            result.failed = f"step {result.steps}: {str(error)[:120]}"
            log(f"    {run}: training stopped, {result.failed}")
            break
        spent += time.process_time() - start
        if result.steps == 0:
            result.train_nfe_start = model.train_nfe()
        result.steps += 1
        result.train_nfe_end = model.train_nfe()
        while checkpoints and spent >= checkpoints[0]:
            checkpoints.pop(0)
            record_curve()
        if spent - last_report >= budget / 4 or spent >= budget:
            last_report = spent
            result.curve.append((round(spent, 1), result.steps, loss.item()))
            log(f"    {run}: {spent:6.1f} s  step {result.steps:5d}  loss {loss.item():.3f}  train NFE {result.train_nfe_end}")
    result.cpu_s = spent
    field = model.scored_field()
    if field is not None:
        field.eval()
        result.nfe_end = field_nfe(field, nfe_batch)
    if evaluate:
        with torch.no_grad():
            if field is not None:
                logp = exact_log_prob(field, test)
            else:
                logp = torch.cat([model.log_prob(rows) for rows in test.split(4096)])
        result.nll = -logp.double().mean().item()
        if model.own_log_prob is not None:
            with torch.no_grad():
                own = torch.cat([model.own_log_prob(rows) for rows in test.split(4096)])
            result.nll_own = -own.double().mean().item()
        n = result.n_curve or min(n_curve, len(test))
        result.nll_subset = -logp[:n].double().mean().item()
        if result.nll_curve:
            result.nll_curve.append((round(spent, 2), result.steps, result.nll_subset))
    if keep is not None:
        keep["model"] = model
    return result


def time_to_reach(curve: Sequence[Sequence[float]], target: float) -> float:
    """The first recorded CPU time at which ``curve`` (``(s, steps, nll)`` rows) is at or
    below ``target``; NaN if never."""
    return next((s for s, _, nll in curve if nll <= target), math.nan)


def solver_costs(field: nn.Module, test: Tensor, d: int, n_sample: int = 10_000, steps=(4, 8, 16)) -> dict:
    """A trained field's sampling cost and its likelihood on fixed grids: the forward NFE of
    sampling ``n_sample`` points with dopri5 at :data:`NFE_TOL` (no trace), and the held-out
    NLL evaluated with rk4 on ``k`` steps (exact trace) for each ``k`` in ``steps``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n_sample, d, generator=g, dtype=test.dtype)
    sampler = pyro_cnf.ContinuousFlow(field, trace="exact", rtol=NFE_TOL, atol=NFE_TOL,
                                      options={"max_num_steps": 20_000})
    with torch.no_grad():
        start = time.process_time()
        sampler(z, reverse=True, logdet=False)
        out = dict(sample_nfe=sampler.nfe, sample_cpu_s=time.process_time() - start, rk4={})
        for k in steps:
            flow = pyro_cnf.ContinuousFlow(field, trace="exact", method="rk4", steps=k)
            logp = torch.cat([normal_log_prob(zz) + ladj for zz, ladj in (flow(rows) for rows in test.split(4096))])
            out["rk4"][k] = -logp.double().mean().item()
    return out
