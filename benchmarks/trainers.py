"""Density training runs under an equal CPU budget, and the one exact evaluator they are
all scored by (W2, W4).

Each run builds a model, then trains it with ``pyro_cnf.training.Trainer`` (Adam on fresh
minibatches) until the CPU time of its steps reaches the budget. CNF runs are scored by
:func:`exact_nll`: their trained field integrated by ``pyro_cnf.ContinuousFlow`` with the
exact trace at rtol = atol = 1e-6, so that every CNF is judged by the same solver and no
run profits from a loose tolerance or a noisy trace. MAF is exact by construction and
scored by its own ``log_prob``. The peers (zuko, torchdyn, nflows' MAF) train through the
same Trainer as small modules with ``log_prob``.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field as dc_field, fields

import torch
from torch import Tensor, nn

import pyro_cnf
from common import normal_log_prob
from peers import TimeInjected
from pyro_cnf.flow import FIELD_OPTIONS
from pyro_cnf.presets import PRESETS
from pyro_cnf.training import FlowMatching, MaximumLikelihood, Objective, Trainer, TrainingError

#: Rows of one minibatch of W2 and W4, every run alike.
BATCH = 256
#: The Adam learning rate every W2/W4 run shares (flow matching: its preset's).
LR = 2e-3
#: The field widths of the CNF runs (the density preset's, ODENet's default); the peers get
#: the same (zuko's MLP, the MAF's hidden features), for equal capacity.
WIDTHS = PRESETS["density"].field["hidden_dims"]
#: Keys of a flow-matching recipe (:func:`fm_recipe`) beside the field's ODENet keywords.
FM_KEYS = frozenset({"lr", "schedule", "ema", "batches"} | {f.name for f in fields(FlowMatching)})


def fm_recipe(preset: str = "flow_matching") -> dict:
    """The ``pyro_cnf_fm`` run of a flow-matching preset: its field (ODENet keywords), its
    ``lr``, ``schedule``, ``path`` and ``coupling``, and its batch as ``batches``
    minibatches of :data:`BATCH` rows per step. A recipe may also set the Trainer's
    ``ema`` and FlowMatching's ``sigma_min`` and ``t_power`` (their defaults otherwise)."""
    p = PRESETS[preset]
    batches, rest = divmod(p.training["batch_size"], BATCH)
    if rest or not batches:
        raise ValueError(f"preset {preset!r}: batch_size {p.training['batch_size']} is not a multiple of {BATCH}")
    training = {k: v for k, v in p.training.items() if k in FM_KEYS}
    return {**p.field, "lr": p.lr, **training, "batches": batches}


def recipe_text(recipe: Mapping) -> str:
    """A flow-matching recipe in words, for run descriptions and reports."""
    return (f"ODENet {'x'.join(map(str, recipe['hidden_dims']))} {recipe['activation']}, time_gate_scale "
            f"{recipe['time_gate_scale']:g}, {recipe['path']} path, {recipe['coupling']} coupling, "
            f"{recipe['batches']} minibatches per step, Adam lr {recipe['lr']:g} with the "
            f"{recipe['schedule']} schedule")


#: The ``pyro_cnf_fm`` run (:func:`fm_recipe` of the "flow_matching" preset; ``schedule``
#: "cosine" decays the rate to 0 over the CPU budget).
FM_RECIPE = fm_recipe()

#: Run names and what they train; see :func:`build`.
RUNS = {
    "pyro_cnf_dopri5": "pyro_cnf MLE, dopri5 rtol=atol=1e-5 (training too), closed-form exact trace",
    "pyro_cnf_rk4": "pyro_cnf MLE, rk4 with 8 steps, closed-form exact trace",
    "pyro_cnf_rk4_rnode": "pyro_cnf MLE, rk4 with 8 steps + RNODE (lambda_k = lambda_j = 0.01)",
    "pyro_cnf_dopri5_rnode": "pyro_cnf MLE, dopri5 rtol=atol=1e-5 + RNODE (lambda_k = lambda_j = 0.05; "
                             "`pyro_cnf_dopri5_rnode@L` sets both to L)",
    "pyro_cnf_fm": f"pyro_cnf flow matching with the 'flow_matching' preset (trainers.FM_RECIPE: "
                   f"{recipe_text(FM_RECIPE)}; digits: the 'flow_matching_wide' preset), then the exact CNF "
                   "likelihood",
    "pyro_cnf_dopri5x3": "pyro_cnf MLE, dopri5 on a fixed grid of 3 steps (19 NFE), closed-form exact trace",
    "pyro_cnf_dopri5x2": "pyro_cnf MLE, dopri5 on a fixed grid of 2 steps (13 NFE), closed-form exact trace",
    "pyro_cnf_dopri5x2_rnode": "pyro_cnf MLE, dopri5 on a fixed grid of 2 steps (13 NFE) + RNODE (lambda_k = "
                               "lambda_j = 0.05), closed-form exact trace",
    "pyro_cnf_hutch": "pyro_cnf MLE, dopri5 rtol=atol=1e-5, Hutchinson trace (Rademacher)",
    "zuko": "zuko.flows.CNF (its ELU MLP at the CNF runs' widths), dopri5 atol=rtol=1e-5, its exact trace (d <= 8) "
            "or Hutchinson",
    "torchdyn": "torchdyn CNF + NeuralODE (dopri5 1e-5, autograd), same ODENet field, exact trace",
    "torchdyn_default": "torchdyn CNF + NeuralODE at torchdyn's defaults (tsit5, atol = rtol = 1e-3), same ODENet "
                        "field, exact trace",
    "maf": "nflows MaskedAutoregressiveFlow, 5 layers, hidden features the CNF runs' first width",
}
EVAL_TOL = 1e-6
#: The NFE of a trained field is measured with this adaptive solve (exact trace).
NFE_TOL = 1e-5


@dataclass
class Model:
    """What a run trains and how it is scored.

    ``module`` is what the Trainer trains by ``objective``, with ``lr`` (None: the shared
    one), ``schedule`` and ``ema``, on ``batches`` minibatches per step. ``field`` maps the
    trained module (the weight average with ``ema``) to the field the exact evaluator
    integrates (CNFs; ``None``: scored by the module's own ``log_prob``); ``train_nfe``
    gives the NFE of the last training solve; ``own_log_prob`` maps the trained module to
    log p(x) by the run's own training solver (exact trace): a flow trained on a coarse grid
    is only worth its NFE if this agrees with the exact evaluator."""

    module: nn.Module
    objective: Objective = dc_field(default_factory=MaximumLikelihood)
    field: Callable[[nn.Module], nn.Module] | None = None
    train_nfe: Callable[[], int] = lambda: 0
    lr: float | None = None
    schedule: str = "constant"
    ema: float = 0.0
    batches: int = 1
    own_log_prob: Callable[[nn.Module], Callable[[Tensor], Tensor]] | None = None


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


@contextlib.contextmanager
def solver_errors() -> Iterator[None]:
    """zuko's and torchdyn's solvers fail by assertion: make that the SolverError the
    Trainer handles."""
    try:
        yield
    except AssertionError as error:
        raise pyro_cnf.SolverError(str(error)) from error


class ZukoDensity(nn.Module):
    """zuko.flows.CNF with ``log_prob`` and the calls of its MLP in the last forward solve."""

    def __init__(self, d: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        import zuko

        self.flow = zuko.flows.CNF(d, hidden_features=hidden, atol=1e-5, rtol=1e-5, exact=d <= 8)
        self.calls = 0
        self.flow.transform.ode.register_forward_hook(self._count)

    def _count(self, *args: object) -> None:
        self.calls += 1

    def log_prob(self, x: Tensor) -> Tensor:
        self.calls = 0
        with solver_errors():
            return self.flow().log_prob(x)


class TorchdynDensity(nn.Module):
    """torchdyn's CNF + NeuralODE on a field ``net``, with ``log_prob``."""

    def __init__(self, net: nn.Module, solver: str = "dopri5", tol: float = 1e-5) -> None:
        super().__init__()
        from torchdyn.core import NeuralODE
        from torchdyn.models.cnf import CNF, autograd_trace

        self.net = net
        with contextlib.redirect_stdout(io.StringIO()):  # torchdyn prints a notice about wrapping
            self.node = NeuralODE(CNF(TimeInjected(net), trace_estimator=autograd_trace), solver=solver,
                                  sensitivity="autograd", atol=tol, rtol=tol, return_t_eval=False)
        self.register_buffer("t_span", torch.tensor([0.0, 1.0]), persistent=False)

    def log_prob(self, x: Tensor) -> Tensor:
        self.node.vf.nfe = 0
        with solver_errors():
            sol = self.node(torch.cat([x.new_zeros(x.shape[0], 1), x], 1), self.t_span)[-1]
        # torchdyn integrates -tr J in column 0: log p(x) = log p(z) - that.
        return normal_log_prob(sol[:, 1:]) - sol[:, 0]


def build_fm(d: int, recipe: Mapping | None = None) -> Model:
    """The flow-matching run of :data:`FM_RECIPE`, with ``recipe``'s entries replacing its own
    (ODENet keywords and :data:`FM_KEYS`)."""
    r = {**FM_RECIPE, **(recipe or {})}
    unknown = set(r) - FM_KEYS - FIELD_OPTIONS - {"hidden_dims"}
    if unknown:
        raise ValueError(f"unknown flow-matching options {sorted(unknown)}; expected ODENet keywords or some of "
                         f"{sorted(FM_KEYS)}")
    net = pyro_cnf.ODENet(d, **{k: v for k, v in r.items() if k not in FM_KEYS})
    objective = FlowMatching(**{f.name: r[f.name] for f in fields(FlowMatching) if f.name in r})
    trainer = {k: r[k] for k in ("lr", "schedule", "ema") if k in r}
    return Model(pyro_cnf.ContinuousFlow(net), objective, field=lambda flow: flow.vector_field,
                 batches=int(r["batches"]), **trainer)


def build(run: str, d: int, recipe: Mapping | None = None) -> Model:
    """A fresh model for ``run`` (a key of :data:`RUNS`) on ``d``-dimensional data;
    ``recipe`` overrides entries of :data:`FM_RECIPE` for ``pyro_cnf_fm``."""
    if run == "pyro_cnf_fm":
        return build_fm(d, recipe)
    run, _, lam_text = run.partition("@")  # pyro_cnf_dopri5_rnode@0.1: RNODE weight 0.1
    if lam_text and not run.endswith("_rnode"):
        raise ValueError(f"a weight @{lam_text} applies to the *_rnode runs only, not {run!r}")
    if run.startswith("pyro_cnf") and run in RUNS:
        grid = re.match(r"pyro_cnf_dopri5x(\d+)", run)
        fixed = grid or run.startswith("pyro_cnf_rk4")
        # the density field; on a fixed grid without its gains, which would learn the grid's error
        net = pyro_cnf.ODENet(d, **PRESETS["density_fixed_grid" if fixed else "density"].field)
        kw = (dict(method="rk4", steps=8) if run.startswith("pyro_cnf_rk4") else dict(steps=int(grid[1]))
              if grid else dict(rtol=1e-5, atol=1e-5))
        regularize = run.endswith("_rnode")
        lam = (float(lam_text) if lam_text else 0.01 if run == "pyro_cnf_rk4_rnode" else 0.05) if regularize else 0.0
        trace = "hutchinson" if run == "pyro_cnf_hutch" else "exact"
        flow = pyro_cnf.ContinuousFlow(net, trace=trace, regularize=regularize, **kw)

        def own_log_prob(trained: nn.Module) -> Callable[[Tensor], Tensor]:
            # the same solver, no penalty integrals
            return pyro_cnf.ContinuousFlow(trained.vector_field, trace="exact", **kw).log_prob

        return Model(flow, MaximumLikelihood(lam, lam), field=lambda trained: trained.vector_field,
                     train_nfe=lambda: flow.nfe, own_log_prob=None if trace == "hutchinson" else own_log_prob)
    if run == "zuko":
        zuko = ZukoDensity(d, WIDTHS)
        return Model(zuko, field=lambda trained: ZukoField(trained.flow.transform, d), train_nfe=lambda: zuko.calls)
    if run in ("torchdyn", "torchdyn_default"):
        own = run == "torchdyn_default"
        torchdyn = TorchdynDensity(pyro_cnf.ODENet(d, **PRESETS["density"].field), "tsit5" if own else "dopri5",
                                   1e-3 if own else 1e-5)
        return Model(torchdyn, field=lambda trained: trained.net, train_nfe=lambda: int(torchdyn.node.vf.nfe))
    if run == "maf":
        from nflows.flows import MaskedAutoregressiveFlow

        return Model(MaskedAutoregressiveFlow(features=d, hidden_features=WIDTHS[0], num_layers=5,
                                              num_blocks_per_layer=2))
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
          nfe_batch: Tensor, lr: float = LR, seed: int = 0, log=print, evaluate: bool = True,
          curve_at: Sequence[float] = (), n_curve: int = 2000, recipe: Mapping | None = None,
          keep: dict | None = None) -> RunResult:
    """Train ``run`` for ``budget`` CPU seconds on ``next_batch(step)``; score it on ``test``.

    ``curve_at``: CPU seconds at which the held-out NLL of the first ``n_curve`` test
    points is recorded in ``result.nll_curve`` (exact evaluator; the evaluation's own time
    is not counted in the budget). ``keep``, a dict, receives the trained ``field`` (CNFs)."""
    torch.manual_seed(seed)
    model = build(run, d, recipe=recipe)
    result = RunResult(run)
    if model.field is not None:
        result.nfe_start = field_nfe(model.field(model.module), nfe_batch)
    checkpoints = sorted(c for c in curve_at if 0 < c < budget) if model.field is not None else []
    result.n_curve = min(n_curve, len(test)) if checkpoints else 0
    k = model.batches
    batches = next_batch if k == 1 else lambda step: torch.cat([next_batch(step * k + j) for j in range(k)])
    last_report = [0.0]

    def record(trainer: Trainer, metrics: dict[str, float]) -> None:
        """After every step: NFE, the NLL curve, and a log line every quarter of the budget."""
        result.steps, spent = trainer.step, trainer.cpu_seconds
        if trainer.step == 1:
            result.train_nfe_start = model.train_nfe()
        result.train_nfe_end = model.train_nfe()
        while checkpoints and spent >= checkpoints[0]:
            checkpoints.pop(0)
            nll = -exact_log_prob(model.field(trainer.eval_model), test[: result.n_curve]).double().mean().item()
            result.nll_curve.append((round(spent, 2), trainer.step, nll))
        if spent - last_report[0] >= budget / 4 or spent >= budget:
            last_report[0] = spent
            result.curve.append((round(spent, 1), trainer.step, metrics["loss"]))
            log(f"    {run}: {spent:6.1f} s  step {trainer.step:5d}  loss {metrics['loss']:.3f}  "
                f"train NFE {result.train_nfe_end}")

    trainer = Trainer(model.module, batches, model.objective, lr=model.lr if model.lr is not None else lr,
                      schedule=model.schedule, ema=model.ema, callbacks=[record], disable=True)
    try:
        trainer.fit(cpu_seconds=budget)
    except TrainingError as error:
        result.failed = f"step {trainer.step}: {str(error.__cause__ or error)[:120]}"
        log(f"    {run}: training stopped, {result.failed}")
    result.cpu_s = trainer.cpu_seconds
    field = None if model.field is None else model.field(trainer.eval_model).eval()
    if field is not None:
        result.nfe_end = field_nfe(field, nfe_batch)
    if evaluate:
        with torch.no_grad():
            if field is not None:
                logp = exact_log_prob(field, test)
            else:
                trainer.eval_model.eval()
                logp = torch.cat([trainer.eval_model.log_prob(rows) for rows in test.split(4096)])
        result.nll = -logp.double().mean().item()
        if model.own_log_prob is not None:
            own_log_prob = model.own_log_prob(trainer.eval_model)
            with torch.no_grad():
                own = torch.cat([own_log_prob(rows) for rows in test.split(4096)])
            result.nll_own = -own.double().mean().item()
        n = result.n_curve or min(n_curve, len(test))
        result.nll_subset = -logp[:n].double().mean().item()
        if result.nll_curve:
            result.nll_curve.append((round(result.cpu_s, 2), result.steps, result.nll_subset))
    if keep is not None:
        keep["field"] = field
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
