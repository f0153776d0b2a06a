"""Defaults study: which ODENet field settings and learning rates learn fastest
for a user who never changes a setting, across every use the package serves.

A *config* names a field setting
``activation:init:time_gate_scale:hidden[:input_gain[:time_gain[:hidden_gain[:scale_rate]]]]``, e.g.
``tanh:zero:0.1:64x64``; gains left out are 1, a scale rate left out 0, and a blank entry takes the density
preset's value. :meth:`Config.of` writes a preset's field so (:data:`DEFAULTS`: each use's preset, e.g.
the density preset's as ODENet's defaults, the guide preset's for SVI). ``init`` is ``zero`` (last
layer zeroed: the flow starts as the identity), ``torch`` (torch's default init) or
``small<f>`` (torch's init of the last layer scaled by ``f``, ``small`` = ``small0.1``). Every use is a function
``(config, lr, seed, ...) -> metrics``; the study applies the variants that ODENet does not
offer (small last layer) after building the field, and never touches the solver settings,
which stay the library's defaults (dopri5, rtol = atol = 1e-5, trace "auto", i.e. the
closed-form exact trace of ODENet).

Training: every torch module (a config's ``ContinuousFlow``, nflows' ``Flow`` around a
``CNFTransform``, a conditional MAF, zuko, torchdyn) trains through
``pyro_cnf.training.Trainer`` with an objective (``MaximumLikelihood`` or ``FlowMatching``)
in :func:`fit`, on ``steps`` steps or a CPU budget (the CPU time of the steps themselves,
not of drawing the data). The peers come from ``benchmarks/trainers.py`` (``build``,
``build_fm``); zuko keeps its own default tolerances (atol 1e-6, rtol 1e-5). SVI keeps
Pyro's ``SVI.step`` loop (:func:`use_svi`). Every CNF is scored alike: held-out NLL of its
trained field (the weight average with ``ema``) by dopri5 at rtol = atol = 1e-6 with the
exact trace.

Uses (``--uses``): ``mle`` (8 Gaussians and checkerboard, batch 512, equal steps, beside
zuko's default CNF), ``mle_cpu`` (equal CPU time at the density preset's lr, beside zuko and torchdyn, the latter at
1e-5 and at its own defaults),
``digits`` (64-d, equal steps at each ``--lrs`` and equal CPU at each ``--digits-budget-lrs``,
default 1e-3, beside zuko and a MAF), ``svi`` (banana, 10-d funnel, Bayesian logistic regression; beside AutoNormal,
AutoIAFNormal and a spline AutoNormalizingFlow), ``fm`` (flow matching on the checkerboard,
equal CPU, beside a 5-layer MAF and trainers.FM_RECIPE), ``cond`` (a two-moons posterior,
nflows ``CNFTransform`` at each ``--lrs`` beside a 5-layer conditional MAF at the same lrs,
raw and z-scored, ``--cond-budget`` CPU s each; ``--cond-pyro`` adds Pyro's
``ConditionalCNF`` at the density preset's lr) and ``demo`` (the demo preset's training, its
fixed-grid solver and batch, at several lrs and schedules). Without ``--configs`` each use runs
its own preset's config (:data:`DEFAULTS`).

Commands (from the repository root; one study process at a time, one thread):

    OMP_NUM_THREADS=1 python benchmarks/defaults.py --uses mle --configs tanh:zero:0.1:64x64 --lrs 1e-2 \\
        --datasets 8gaussians --seeds 0 --no-peers         # reproduction check (BENCHMARKS.md, "Defaults")
    OMP_NUM_THREADS=1 python benchmarks/defaults.py --uses cond --lrs 5e-4,1e-3 \\
        --configs tanh:zero:0.1:64x64,silu:zero:0.1:64x64,softplus:zero:0.1:64x64
    OMP_NUM_THREADS=1 python benchmarks/defaults.py --uses digits --lrs 1e-3,1e-2 \\
        --configs tanh:zero:0.1:64x64,silu:zero:0.1:64x64,softplus:zero:0.1:64x64
    OMP_NUM_THREADS=1 python benchmarks/defaults.py --uses digits --lrs 1e-3,1e-2 --digits-budget-lrs 1e-3,1e-2 \\
        --configs tanh:zero:0.1:64x64,silu:zero:0.1:64x64,softplus:zero:0.1:64x64   # + equal CPU at 1e-2
    OMP_NUM_THREADS=1 python benchmarks/defaults.py --uses mle --configs tanh:zero:0.1:64x64 --seeds 2 --lrs 1e-3,1e-2
    OMP_NUM_THREADS=1 python benchmarks/defaults.py --uses mle,svi --configs softplus:zero:0.1:64x64,tanh:zero:0.1:64x64
    python benchmarks/defaults.py --quick            # smoke run of every use, a few minutes
    python benchmarks/defaults.py --report-only      # rebuild report.md from results.json

Results accumulate in ``--out``/results.json (default ``out/defaults``; a record replaces
the one with the same key, and a key already there is not run again); ``report.md`` is
rebuilt from all records after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "examples")]  # this checkout's pyro_cnf

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import pyro_cnf  # noqa: E402
from common import table  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.toy import datasets  # noqa: E402
from pyro_cnf.training import FlowMatching, Trainer, TrainingError, nll  # noqa: E402
from trainers import BATCH, EVAL_TOL, FM_RECIPE, Model, build, build_fm, field_nfe  # noqa: E402

LRS = (5e-4, 1e-3, 1e-2)
#: The rate of the density builders (mle_cpu, and the Pyro ConditionalCNF of cond).
DENSITY_LR = PRESETS["density"].lr
#: The demo's recipe: its fixed-grid solver, batch size and steps.
DEMO = PRESETS["demo"]
TOYS = ("8gaussians", "checkerboard")
TEST_SEED = 10**6
N_TEST = 20_000


# --------------------------------------------------------------------------- configs

_DENSITY = PRESETS["density"].field


@dataclass(frozen=True)
class Config:
    """An ODENet field setting; gains of 1 and a scale rate of 0 are none."""

    activation: str = _DENSITY["activation"]
    init: str = "zero"
    gate: float = _DENSITY["time_gate_scale"]
    hidden: tuple[int, ...] = _DENSITY["hidden_dims"]
    gain: float = 1.0
    time_gain: float = 1.0
    hidden_gain: float = 1.0
    scale_rate: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Config:
        """The config of ``text``; a blank or missing entry takes the default above."""
        widths = lambda h: tuple(int(w) for w in h.split("x"))  # noqa: E731
        kinds = (str, str, float, widths, float, float, float, float)
        values = text.split(":")
        if len(values) > len(kinds):
            raise ValueError(f"a config has at most {len(kinds)} entries, got {text!r}")
        names = [f.name for f in fields(cls)]
        return cls(**{name: kind(v) for name, kind, v in zip(names, kinds, values) if v})

    @classmethod
    def of(cls, preset: str) -> Config:
        """The field of the preset ``preset``, zero-initialised as every builder's."""
        f = PRESETS[preset].field
        return cls(f["activation"], "zero", f["time_gate_scale"], tuple(f["hidden_dims"]), f["input_gain"],
                   f["time_gain"], f["hidden_gain"], f["scale_rate"])

    @property
    def name(self) -> str:
        gains = (self.gain, self.time_gain, self.hidden_gain)
        if self.scale_rate:
            gains = (*gains, self.scale_rate)
        while gains and gains[-1] == 1:  # trailing gains of 1 are left out
            gains = gains[:-1]
        gains = "".join(f":{g:g}" for g in gains)
        return f"{self.activation}:{self.init}:{self.gate:g}:{'x'.join(map(str, self.hidden))}{gains}"

    def field(self, d: int, context_dim: int = 0, hidden: tuple[int, ...] | None = None) -> pyro_cnf.ODENet:
        net = pyro_cnf.ODENet(d, hidden or self.hidden, context_dim, activation=self.activation,
                              zero_init=self.init == "zero", time_gate_scale=self.gate, input_gain=self.gain,
                              time_gain=self.time_gain, hidden_gain=self.hidden_gain, scale_rate=self.scale_rate)
        if self.init.startswith("small"):
            factor = float(self.init[5:] or 0.1)
            with torch.no_grad():
                net.linears[-1].weight.mul_(factor)
                net.linears[-1].bias.mul_(factor)
        elif self.init not in ("zero", "torch"):
            raise ValueError(f"init must be zero, torch or small<f>, got {self.init!r}")
        return net

    def flow(self, d: int, context_dim: int = 0, hidden=None, **kw) -> pyro_cnf.ContinuousFlow:
        return pyro_cnf.ContinuousFlow(self.field(d, context_dim, hidden), **kw)

    def model(self, d: int, **kw) -> Model:
        """The flow (``kw``: ContinuousFlow settings) as a run: maximum likelihood, scored
        by its field."""
        flow = self.flow(d, **kw)
        return Model(flow, field=lambda trained: trained.vector_field, train_nfe=lambda: flow.nfe)


#: The preset a user of each use gets without changing a setting.
USE_PRESETS = {"mle": "density", "mle_cpu": "density", "digits": "density", "svi": "guide", "fm": "flow_matching",
               "cond": "density", "demo": "demo"}
#: Each use's default config: its "(default)" row of the report, and what it runs without --configs.
DEFAULTS = {use: Config.of(preset).name for use, preset in USE_PRESETS.items()}


def is_config(name: str) -> bool:
    return ":" in name


# --------------------------------------------------------------------------- training

def fit(model: Model, batches: Callable[[int], Tensor | tuple[Tensor, Tensor]], lr: float, *,
        steps: int | None = None, budget: float | None = None) -> tuple[dict, nn.Module]:
    """Train ``model.module`` by ``model.objective`` through the Trainer: Adam at ``model.lr``
    (None: ``lr``) with ``model.schedule`` and ``model.ema``, on ``model.batches``
    minibatches ``batches(i)`` per step, for ``steps`` steps and/or ``budget`` CPU s of the
    steps. A solver failure or a non-finite loss stops the run and is recorded in ``failed``.
    Returns the metrics and the model to score (the weight average with ``ema``)."""
    k = model.batches
    step_batch = batches if k == 1 else lambda i: torch.cat([batches(i * k + j) for j in range(k)])
    trainer = Trainer(model.module, step_batch, model.objective, lr=model.lr if model.lr is not None else lr,
                      schedule=model.schedule, ema=model.ema, disable=True)
    failed = ""
    try:
        trainer.fit(steps, cpu_seconds=budget)
    except (TrainingError, ValueError, AssertionError) as error:  # ValueError: Pyro's and nflows' checks
        failed = f"step {trainer.step}: {str(getattr(error, '__cause__', None) or error)[:100]}"
    loss = trainer.history[-1].get("loss", math.nan) if trainer.history else math.nan
    res = dict(steps=trainer.step, cpu_s=trainer.cpu_seconds, loss=loss, failed=failed,
               train_nfe_end=model.train_nfe())
    return res, trainer.eval_model.eval()


def tight(field: nn.Module) -> pyro_cnf.ContinuousFlow:
    """The evaluator: ``field`` by dopri5 at rtol = atol = EVAL_TOL with the exact trace."""
    return pyro_cnf.ContinuousFlow(field, trace="exact", rtol=EVAL_TOL, atol=EVAL_TOL,
                                   options={"max_num_steps": 20_000}).eval()


def score(model: Model, trained: nn.Module, test: Tensor) -> dict:
    """Held-out NLL of a trained run: its field by the tight solve, with the NFE of a dopri5
    1e-5 solve of 1024 test rows (CNFs), else its own ``log_prob`` (MAF)."""
    if model.field is None:
        return dict(nll=nll(trained, test))
    field = model.field(trained).eval()
    try:
        return dict(nll=nll(tight(field), test), nfe_end=field_nfe(field, test[:1024]))
    except pyro_cnf.SolverError as error:
        return dict(nll=math.nan, nfe_end=0, eval_failed=str(error)[:100])


def peer(run: str, d: int) -> Model:
    """A peer as benchmarks/trainers.py builds it; zuko at its own default tolerances
    (atol 1e-6, rtol 1e-5; exact trace at d <= 8, else Hutchinson)."""
    model = build(run, d)
    if run == "zuko":
        model.module.flow.transform.atol = 1e-6
    return model


def toy(name: str):
    k = sum(map(ord, name))
    test = datasets.sample(name, N_TEST, seed=TEST_SEED + k).float()
    return test, (lambda i, seed, batch: datasets.sample(name, batch, seed=seed * 100_003 + 7919 * (k + 1) + i).float())


# --------------------------------------------------------------------------- uses

def use_mle(run: str, lr: float, seed: int, dataset: str, steps: int | None = 300, budget: float | None = None,
            batch: int = 512, schedule: str = "constant") -> dict:
    """Maximum likelihood on a 2-D toy: ``steps`` Adam steps (or ``budget`` CPU s)."""
    test, draw = toy(dataset)
    torch.manual_seed(seed)
    model = Config.parse(run).model(2) if is_config(run) else peer(run, 2)
    model.schedule = schedule
    res, trained = fit(model, lambda i: draw(i, seed, batch), lr, steps=steps, budget=budget)
    res.update(score(model, trained, test))
    res["cpu_per_step_ms"] = 1e3 * res["cpu_s"] / max(res["steps"], 1)
    return res


def use_demo(run: str, lr: float, seed: int, dataset: str = "checkerboard", steps: int = DEMO.training["steps"],
             schedule: str = "constant") -> dict:
    """The demo's training: the demo preset's fixed-grid solver and batch size; scored by the tight solve."""
    test, draw = toy(dataset)
    torch.manual_seed(seed)
    model = Config.parse(run).model(2, **DEMO.flow)
    model.schedule = schedule
    res, trained = fit(model, lambda i: draw(i, seed, DEMO.training["batch_size"]), lr, steps=steps)
    res.update(score(model, trained, test))
    res["nll_rk4x4"] = nll(trained, test)  # the demo reports its own solver's NLL
    return res


def use_digits(run: str, lr: float, seed: int, steps: int | None = 300, budget: float | None = None,
               batch: int = BATCH) -> dict:
    """64-d digits (benchmarks/w4_digits.py data); NLL of the dequantised y, nats/image."""
    from w4_digits import digits

    train_px, test_y, standardise, log_det = digits(0)
    test = standardise(test_y)
    g = torch.Generator().manual_seed(seed + 2)
    n = train_px.shape[0]

    def draw(i: int) -> Tensor:
        rows = torch.randint(n, (batch,), generator=g)
        return standardise((train_px[rows] + torch.rand(batch, 64, generator=g, dtype=torch.float64)) / 17)

    torch.manual_seed(seed)
    # zuko's exact trace at d = 64 is 64 VJPs per evaluation: peer() gives its Hutchinson here
    model = Config.parse(run).model(64) if is_config(run) else peer(run, 64)
    res, trained = fit(model, draw, lr, steps=steps, budget=budget)
    res.update(score(model, trained, test))
    res["nll"] -= log_det  # nats per image of y
    return res


def use_fm(run: str, lr: float, seed: int, dataset: str = "checkerboard", budget: float = 40.0,
           batch: int | str = PRESETS["flow_matching"].training["batch_size"], path: str = "ot",
           schedule: str = "constant", ema: float = 0.0, coupling: str = "independent",
           t_power: float | str = 1.0) -> dict:
    """Flow matching of a config's field (``FlowMatching(path, coupling, t_power)``; ``ema``
    > 0 scores the weight average), or ``fm_recipe`` (trainers.FM_RECIPE: its own lr, schedule and
    objective, one minibatch of ``batch`` rows per step like the other runs; ``batch``'s
    default is the flow-matching preset's), or ``maf`` (maximum likelihood); equal CPU budget."""
    test, draw = toy(dataset)
    torch.manual_seed(seed)
    if is_config(run):
        model = Config.parse(run).model(2)
        objective = FlowMatching(path=path, coupling=coupling, t_power=float(t_power))
        model.objective, model.schedule, model.ema = objective, schedule, ema
    elif run == "fm_recipe":
        model = build_fm(2, recipe={"batches": 1})
    else:
        model = peer(run, 2)
    res, trained = fit(model, lambda i: draw(i, seed, int(batch)), lr, budget=budget)
    res.update(score(model, trained, test))
    return res


# --- SVI

def funnel10() -> None:
    """Neal's funnel in 10-d: z ~ N(0, 3), x_1..9 | z ~ N(0, exp(z / 2)); evidence 1."""
    import pyro
    import pyro.distributions as dist

    z = pyro.sample("z", dist.Normal(0.0, 3.0))
    scale = torch.exp(z / 2).unsqueeze(-1).expand(*z.shape, 9)
    pyro.sample("x", dist.Normal(torch.zeros_like(scale), scale).to_event(1))


def svi_target(name: str):
    """``(model, args)`` of an SVI target."""
    if name == "banana":
        import svi_guide

        return partial(svi_guide.model, "banana"), ()
    if name == "funnel10":
        return funnel10, ()
    if name == "logistic":
        import bayesian_regression

        X, y, _, _ = bayesian_regression.load_data(10, 0)
        return bayesian_regression.model, (X, y)
    raise ValueError(name)


def svi_guide(run: str, model):
    import pyro.distributions.transforms as T
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow

    if run == "AutoNormal":
        return AutoNormal(model)
    if run == "AutoIAFNormal":  # Pyro's defaults: one IAF, hidden 10 x latent dim
        return AutoIAFNormal(model)
    if run == "spline":  # two linear-order spline autoregressive flows, Pyro's defaults
        return AutoNormalizingFlow(model, partial(T.iterated, 2, T.spline_autoregressive))
    run, _, hidden = run.partition("@")  # "config@32x32": other hidden dims for the guide
    cfg = Config.parse(run)
    hid = tuple(int(h) for h in hidden.split("x")) if hidden else None
    return AutoNormalizingFlow(model, lambda d: pyro_cnf.cnf(d, flow=cfg.flow(d, hidden=hid)))


def use_svi(run: str, lr: float, seed: int, target: str, steps: int = 200, particles: int = 16,
            eval_particles: int = 1024, eval_batches: int = 8) -> dict:
    """SVI with Adam and vectorised particles; final ELBO over many particles (KL = -ELBO
    for banana and funnel, whose evidence is 1)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    model, args = svi_target(target)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = svi_guide(run, model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(num_particles=particles, vectorize_particles=True))
    start, failed, i = time.process_time(), "", 0
    try:
        for i in range(steps):
            loss = svi.step(*args)
            if not math.isfinite(loss):
                raise FloatingPointError("ELBO is not finite")
        i = steps
    except (pyro_cnf.SolverError, AssertionError, FloatingPointError, ValueError) as error:
        failed = f"step {i}: {str(error)[:100]}"
    res = dict(steps=i, cpu_s=time.process_time() - start, failed=failed)
    res["cpu_per_step_ms"] = 1e3 * res["cpu_s"] / max(i, 1)
    flow = getattr(getattr(guide, "transform", None), "flow", None)
    if flow is not None:
        res["train_nfe_end"] = flow.nfe
    if failed:
        return res
    elbo = Trace_ELBO(num_particles=eval_particles, vectorize_particles=True)
    with torch.no_grad():
        try:
            est = torch.tensor([-elbo.loss(model, guide, *args) for _ in range(eval_batches)])
        except pyro_cnf.SolverError as error:
            res["failed"] = f"eval: {str(error)[:100]}"
            return res
        res["elbo"], res["elbo_se"] = est.mean().item(), (est.std() / eval_batches**0.5).item()
        if target in ("banana", "funnel10"):
            res["kl"] = -res["elbo"]
        if target == "funnel10":
            with pyro.plate("draws", 8192, dim=-1):
                res["sd_z"] = guide()["z"].std().item()
    return res


# --- conditional

def two_moons(theta: Tensor, g: torch.Generator) -> Tensor:
    """sbi's two-moons simulator: x = p(a, r) + rotation of theta; theta in [-1, 1]^2."""
    n = theta.shape[0]
    a = math.pi * (torch.rand(n, generator=g) - 0.5)
    r = 0.1 + 0.01 * torch.randn(n, generator=g)
    p = torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], -1)
    s = math.sqrt(0.5)
    return p + torch.stack([-(theta[:, 0] + theta[:, 1]).abs() * s, (-theta[:, 0] + theta[:, 1]) * s], -1)


def moons_data(n_train: int = 10_000, n_test: int = 5000):
    g = torch.Generator().manual_seed(12)
    theta = 2 * torch.rand(n_train + n_test, 2, generator=g) - 1
    x = two_moons(theta, g)
    return theta[:n_train], x[:n_train], theta[n_train:], x[n_train:]


class Standardise:
    """Maps (theta, x) to the units a conditional density is fitted in: z-scored by the
    training data's mean and sd (``on``), else as they are. ``log_det`` turns a log density
    of the mapped theta into one of theta: ``log p(theta | x) = log q(theta') + log_det``."""

    def __init__(self, theta: Tensor, x: Tensor, on: bool) -> None:
        self.mt, self.st = (theta.mean(0), theta.std(0)) if on else (torch.zeros(2), torch.ones(2))
        self.mx, self.sx = (x.mean(0), x.std(0)) if on else (torch.zeros(2), torch.ones(2))
        self.log_det = -self.st.log().sum().item()

    def __call__(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return (theta - self.mt) / self.st, (x - self.mx) / self.sx


class PyroConditional(nn.Module):
    """``log_prob(theta, x)`` of a Pyro ``ConditionalCNF`` on a standard normal base."""

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        import pyro.distributions as dist

        self.transform = transform
        self.density = dist.ConditionalTransformedDistribution(
            dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1), [transform])

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.density.condition(x).log_prob(theta)


def conditional_maf(d: int, context: int, layers: int = 5, hidden: int = 64):
    """nflows' MaskedAutoregressiveFlow (reverse permutations, 2 residual blocks per layer,
    hidden 64) with a context; its constructor in nflows 0.14 takes none."""
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

    return Flow(CompositeTransform([t for _ in range(layers) for t in (
        ReversePermutation(d), MaskedAffineAutoregressiveTransform(d, hidden, context_features=context, num_blocks=2))]),
        StandardNormal([d]))


def use_cond(run: str, lr: float, seed: int, budget: float = 60.0, batch: int = 200, zscore: bool = False,
             adapter: str = "nflows", grid: int = 0) -> dict:
    """theta | x on two moons by maximum likelihood for ``budget`` CPU s; held-out NLL of theta.
    A config's flow trains inside nflows' ``Flow(CNFTransform)`` or Pyro's ``ConditionalCNF``
    (``adapter``) and is scored by its field under the tight solve; ``maf`` by its own log_prob.
    ``grid`` > 0 trains the config's flow on a fixed dopri5 grid of that many steps instead of
    the adaptive default (the scoring solve is the same tight one)."""
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow

    theta, x, theta_test, x_test = moons_data()
    frame = Standardise(theta, x, zscore)
    theta_s, x_s = frame(theta, x)
    test_theta, test_x = frame(theta_test, x_test)
    torch.manual_seed(seed)
    if is_config(run):
        flow = Config.parse(run).flow(2, context_dim=2, **({"steps": grid} if grid else {}))
        module = (Flow(pyro_cnf.CNFTransform(2, context_dim=2, flow=flow), StandardNormal([2])) if adapter == "nflows"
                  else PyroConditional(pyro_cnf.ConditionalCNF(2, 2, flow=flow)))
        model = Model(module, field=lambda trained: flow.vector_field, train_nfe=lambda: flow.nfe)
    else:  # maf
        model = Model(conditional_maf(2, 2))
    g = torch.Generator().manual_seed(seed + 5)

    def draw(i: int) -> tuple[Tensor, Tensor]:
        rows = torch.randint(len(theta), (batch,), generator=g)
        return theta_s[rows], x_s[rows]

    res, trained = fit(model, draw, lr, budget=budget)
    try:
        scored = trained if model.field is None else tight(model.field(trained).eval())
        res["nll"] = nll(scored, test_theta, test_x) - frame.log_det
    except pyro_cnf.SolverError as error:
        res["nll"], res["eval_failed"] = math.nan, str(error)[:100]
    return res


# --------------------------------------------------------------------------- driver

def record_key(r: dict) -> str:
    return json.dumps({k: r[k] for k in ("use", "task", "run", "lr", "seed", "variant")}, sort_keys=True)


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save(path: Path, records: list[dict], new: dict) -> list[dict]:
    """Add ``new`` to the records on disk (read again now: another study process may have
    written since this one started) and write them atomically."""
    keyed = {record_key(r): r for r in [*records, *load(path)]}
    keyed[record_key(new)] = new
    records = list(keyed.values())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    return records


def jobs(args) -> list[tuple[str, str, str, float, int, str, Callable]]:
    """``(use, task, run, lr, seed, variant, fn)`` for every run asked for."""
    out = []
    seeds, lrs = args.seeds, args.lrs
    for use in args.uses:
        if use not in DEFAULTS:
            raise SystemExit(f"unknown use {use!r}")
        cfgs = [Config.parse(c).name for c in args.configs] if args.configs else [DEFAULTS[use]]
        if use == "mle":
            for ds in args.datasets:
                for sched in args.schedules:
                    for run in cfgs + (["zuko"] if args.peers and sched == "constant" else []):
                        for lr in lrs:
                            for s in seeds:
                                out.append((use, ds, run, lr, s, sched, partial(
                                    use_mle, dataset=ds, steps=args.steps, schedule=sched)))
        elif use == "mle_cpu":
            for ds in args.datasets:
                for run in cfgs + (["zuko", "torchdyn", "torchdyn_default"] if args.peers else []):
                    for s in seeds:
                        out.append((use, ds, run, DENSITY_LR, s, f"{args.budget:g}s", partial(
                            use_mle, dataset=ds, steps=None, budget=args.budget)))
        elif use == "digits":
            for run in cfgs + (["zuko", "maf"] if args.peers else []):
                for lr in lrs:
                    for s in seeds:
                        out.append((use, "digits", run, lr, s, f"{args.digits_steps}steps",
                                    partial(use_digits, steps=args.digits_steps)))
                for lr in args.digits_budget_lrs:
                    for s in seeds:
                        out.append((use, "digits", run, lr, s, f"{args.digits_budget:g}s",
                                    partial(use_digits, steps=None, budget=args.digits_budget)))
        elif use == "svi":
            peers = ["AutoNormal", "AutoIAFNormal", "spline"] if args.peers else []
            for target in args.targets:
                for steps in args.svi_steps:
                    for run in cfgs + [c + "@" + h for c in cfgs for h in args.svi_hidden] + peers:
                        for lr in args.svi_lrs or lrs:
                            for s in seeds:
                                out.append((use, target, run, lr, s, f"{steps}steps",
                                            partial(use_svi, target=target, steps=steps)))
        elif use == "fm":
            for run in cfgs:
                for path in args.fm_paths:
                    for sched in args.schedules:
                        for lr in args.fm_lrs:
                            for s in seeds:
                                variant = path + ("" if sched == "constant" else f"+{sched}") + (
                                    f"+ema{args.fm_ema:g}" if args.fm_ema else "") + "".join(
                                    f"+{k}={v}" for k, v in args.fm_options.items())
                                out.append((use, "checkerboard", run, lr, s, variant, partial(
                                    use_fm, budget=args.budget, path=path, schedule=sched, ema=args.fm_ema,
                                    **args.fm_options)))
            if args.peers:
                for s in seeds:
                    out.append((use, "checkerboard", "maf", 1e-3, s, "ot", partial(use_fm, budget=args.budget)))
                    out.append((use, "checkerboard", "fm_recipe", FM_RECIPE["lr"], s, "cosine",
                                partial(use_fm, budget=args.budget)))
        elif use == "cond":
            budget_tag = f"+{args.cond_budget:g}s" if args.cond_budget != 60 else ""
            for zs in [f == "zscore" for f in args.cond_frames]:
                variants = [("nflows", r, lr) for r in cfgs + (["maf"] if args.peers else [])
                            for lr in args.cond_lrs or lrs]
                variants += [("pyro", r, DENSITY_LR) for r in cfgs] if args.cond_pyro else []
                for adapter, run, lr in variants:
                    for s in seeds:
                        grid = args.cond_grid if is_config(run) else 0  # the MAF has no solver
                        variant = f"{adapter}{'+zscore' if zs else ''}{f'+grid{grid}' if grid else ''}{budget_tag}"
                        out.append((use, "two_moons", run, lr, s, variant, partial(
                            use_cond, budget=args.cond_budget, zscore=zs, adapter=adapter, grid=grid)))
        elif use == "demo":
            for sched in args.schedules:
                for run in cfgs:
                    for lr in args.demo_lrs:
                        for s in seeds:
                            out.append((use, "checkerboard", run, lr, s, sched,
                                        partial(use_demo, steps=args.demo_steps, schedule=sched)))
    return out


def main(argv=None) -> None:
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    words = lambda s: s.split(",")  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uses", type=words, default=["mle", "svi"])
    p.add_argument("--configs", type=lambda s: s.split(","), default=None,
                   help="comma-separated act:init:gate:hidden[:input_gain[:time_gain[:hidden_gain[:scale_rate]]]] "
                        "(default: each use's preset's, DEFAULTS)")
    p.add_argument("--lrs", type=floats, default=list(LRS))
    p.add_argument("--seeds", type=ints, default=[0])
    p.add_argument("--steps", type=int, default=300, help="MLE equal-steps Adam steps")
    p.add_argument("--schedules", type=words, default=["constant"], help="mle/fm/demo: constant,cosine")
    p.add_argument("--datasets", type=words, default=list(TOYS))
    p.add_argument("--budget", type=float, default=40.0, help="CPU s of mle_cpu and fm")
    p.add_argument("--digits-steps", type=int, default=300)
    p.add_argument("--digits-budget", type=float, default=45.0)
    p.add_argument("--digits-budget-lrs", type=floats, default=[1e-3], help="digits: lrs of the equal-CPU runs")
    p.add_argument("--targets", type=words, default=["banana"], help="svi: banana,funnel10,logistic")
    p.add_argument("--svi-steps", type=ints, default=[200])
    p.add_argument("--svi-lrs", type=floats, default=None, help="default: --lrs")
    p.add_argument("--svi-hidden", type=words, default=[], help="extra CNF guide hidden dims, e.g. 32x32")
    p.add_argument("--fm-paths", type=words, default=["ot"])
    p.add_argument("--fm-options", type=lambda text: dict(kv.split("=") for kv in text.split(",")), default={},
                   help="fm: batch=N, coupling=minibatch_ot, t_power=P (comma-separated)")
    p.add_argument("--fm-lrs", type=floats, default=[1e-3])
    p.add_argument("--fm-ema", type=float, default=0.0, help="fm: score an EMA of the weights with this decay")
    p.add_argument("--cond-budget", type=float, default=60.0)
    p.add_argument("--cond-grid", type=int, default=0, help="cond: train the CNFs on a fixed dopri5 grid of N steps")
    p.add_argument("--cond-frames", type=words, default=["raw", "zscore"], help="cond: raw,zscore")
    p.add_argument("--cond-lrs", type=floats, default=None, help="cond (nflows runs and the MAF): default --lrs")
    p.add_argument("--cond-pyro", action="store_true",
                   help=f"also ConditionalCNF through Pyro at the density preset's lr ({DENSITY_LR:g})")
    p.add_argument("--demo-steps", type=int, default=DEMO.training["steps"])
    p.add_argument("--demo-lrs", type=floats, default=[3e-3, 1e-2, 2e-2])
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, every use")
    p.add_argument("--out", type=Path, default=Path("out/defaults"))
    args = p.parse_args(argv)
    if args.quick:
        global N_TEST
        N_TEST = 2000
        args.uses, args.lrs, args.steps, args.budget = ["mle", "mle_cpu", "digits", "svi", "fm", "cond", "demo"], [1e-2], 10, 2.0
        args.digits_steps, args.digits_budget, args.svi_steps, args.cond_budget = 5, 2.0, [10], 2.0
        args.demo_steps, args.demo_lrs, args.targets, args.datasets = 10, [1e-2], ["banana", "funnel10", "logistic"], ["8gaussians"]
        args.cond_pyro, args.cond_lrs = True, [5e-4]
        if args.out == Path("out/defaults"):
            args.out = Path("out/defaults_quick")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    records = load(path)
    if not args.report_only:
        todo = jobs(args)
        done = {record_key(r) for r in records} if not args.quick else set()
        print(f"{len(todo)} runs", flush=True)
        for n, (use, task, run, lr, seed, variant, fn) in enumerate(todo, 1):
            rec = dict(use=use, task=task, run=run, lr=lr, seed=seed, variant=variant)
            if record_key(rec) in done and not args.quick:
                continue
            t0 = time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                rec.update(fn(run, lr, seed))
            rec["wall_cpu_s"] = time.process_time() - t0
            records = save(path, records, rec)
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                     if k in ("nll", "elbo", "kl", "sd_z", "steps", "nfe_end", "train_nfe_end", "failed", "nll_rk4x4")}
            print(f"[{n}/{len(todo)}] {use} {task} {run} lr={lr:g} s{seed} {variant}: {shown} "
                  f"({rec['wall_cpu_s']:.0f} CPU s)", flush=True)
    (args.out / "report.md").write_text(report(records))
    print(f"wrote {args.out / 'report.md'}")


# --------------------------------------------------------------------------- report

def mean_of(rows: list[dict], key: str) -> tuple[float, float, int]:
    vals = [r[key] for r in rows if key in r and r[key] == r[key] and not r.get("failed")]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def cell(rows: list[dict], key: str, digits: int = 3) -> str:
    m, s, n = mean_of(rows, key)
    fails = sum(1 for r in rows if r.get("failed") or r.get("eval_failed"))
    if n == 0:
        return "fail" if fails else "-"
    text = f"{m:.{digits}f}" + (f" ±{s / math.sqrt(n):.{digits}f}" if n > 1 else "")
    return text + (f" ({fails} fail)" if fails else "")


def pivot(records: list[dict], use: str, task: str, variant: str, key: str, extra=("nfe_end",), digits=3) -> str:
    rows = [r for r in records if r["use"] == use and r["task"] == task and r["variant"] == variant]
    if not rows:
        return ""
    lrs = sorted({r["lr"] for r in rows})
    runs = sorted({r["run"] for r in rows}, key=lambda r: (not is_config(r.partition("@")[0]), r))
    body = []
    for run in runs:
        mine = [r for r in rows if r["run"] == run]
        line = [run + (" (default)" if run == DEFAULTS[use] else "")]
        line += [cell([r for r in mine if r["lr"] == lr], key, digits) for lr in lrs]
        best = min(lrs, key=lambda lr: (mean_of([r for r in mine if r["lr"] == lr], key)[0]
                                        * (-1 if key == "elbo" else 1)) if mean_of(
            [r for r in mine if r["lr"] == lr], key)[2] else math.inf)
        for e in extra:
            line.append(cell([r for r in mine if r["lr"] == best], e, 1))
        body.append(line)
    seeds = sorted({r["seed"] for r in rows})
    head = [f"run \\ lr ({key}, seeds {','.join(map(str, seeds))})"] + [f"{lr:g}" for lr in lrs]
    head += [f"{e} (best lr)" for e in extra]
    return table(head, body)


def report(records: list[dict]) -> str:
    out = ["# Defaults study", "",
           "Runs are `activation:init:time_gate_scale:hidden` configs of `pyro_cnf.ODENet` under the library's "
           "default solver (dopri5, rtol = atol = 1e-5, trace auto = closed-form exact), or peers. NLLs are held-out, "
           "by dopri5 at 1e-6 with the exact trace (lower is better); ELBO higher is better. `nfe_end`: forward NFE of "
           "a dopri5 1e-5 solve of 1024 test points with the trained field; `train_nfe_end`: NFE of the last training "
           "solve; `cpu_per_step_ms`: CPU ms per training step. Cells: mean ± standard error over seeds.", ""]
    groups = defaultdict(list)
    for r in records:
        groups[(r["use"], r["task"], r["variant"])].append(r)
    titles = {"mle": "MLE, equal steps", "mle_cpu": "MLE, equal CPU time", "digits": "Digits (64-d), nats/image",
              "svi": "SVI", "fm": "Flow matching, equal CPU time", "cond": "Conditional two moons, equal CPU time",
              "demo": "Demo training (the demo preset's solver and batch)"}
    for use in titles:
        for (u, task, variant) in sorted(k for k in groups if k[0] == use):
            out.append(f"## {titles[use]}: {task}, {variant}\n")
            if use == "svi":
                key = "elbo"
                extra = ("kl", "sd_z", "cpu_per_step_ms", "train_nfe_end") if task == "funnel10" else (
                    "cpu_per_step_ms", "train_nfe_end")
            else:
                key = "nll"
                extra = {"mle": ("nfe_end", "train_nfe_end", "cpu_per_step_ms"), "mle_cpu": ("steps", "nfe_end"),
                         "digits": ("steps", "nfe_end"), "fm": ("steps", "nfe_end"), "cond": ("steps",),
                         "demo": ("nll_rk4x4", "nfe_end")}[use]
            out.append(pivot(records, u, task, variant, key, extra, 2 if use in ("digits",) else 3))
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
