"""Pyro NUTS on Neal's funnel, plain and NeuTra-reparameterised by a CNF guide.

The funnel in ``--dim`` dimensions: ``z1 ~ N(0, 3)``, ``z2..zD | z1 ~ N(0, exp(z1 / 2))``.
Its neck (``z1`` below about -3) needs steps a hundred times smaller than its mouth, so
plain NUTS either adapts a small step and builds long trees everywhere, or diverges in the
neck and rarely samples it. NeuTra (Hoffman et al., 2019) trains a guide ``q = T(N(0, I))``
by SVI (here ``AutoNormalizingFlow(model, pyro_cnf.cnf)``) and runs NUTS on the pulled-back
density of ``z = T^{-1}(x)``, nearly a standard normal when ``q`` fits
(``pyro.infer.reparam.NeuTraReparam``).

Every NUTS gradient then differentiates through ``T``, here an ODE solve with its
log-determinant: the solver inside HMC decides what a leapfrog step costs. The guide is
trained once (``--train-solver``, the library's default dopri5 unless told), then NUTS runs
once per ``--solvers`` setting, each a name of the form

* ``dopri5``: adaptive, the flow's default tolerances (rtol = atol = 1e-5);
* ``dopri5@1e-3``: adaptive at rtol = atol = 1e-3;
* ``rk4x4``: rk4 on a fixed grid of 4 steps (16 evaluations); ``midpointx4`` (8);
* ``dopri5x2``: dopri5 on a fixed grid of 2 steps (13 evaluations).

A fixed grid makes ``T`` one fixed differentiable map with a cost known in advance
(measured, see the README: ``rk4x4`` is the grid whose log-det error stayed small on both seeds). Its
log-determinant is integrated along the same steps, so it is the exact one only up to the
grid's error, and the chain's target is off by ``exp(error)``: each NeuTra run reports that
error at its draws (``logdet_error``, against autograd's Jacobian of the map it computed).

Reported per run (one chain): CPU and wall time of warmup + sampling, the bulk effective
sample size (Pyro's ``effective_sample_size``) of ``z1`` and the smallest over all
coordinates, ESS per CPU second (sampling alone, and for NeuTra also counting the guide's
training), divergent transitions, the mean and standard deviation of ``z1`` (truth: 0 and
3), and for NeuTra the ODE solves per draw. CPU time, not wall time, is the clock: it is
what the run costs, whatever else shares the machine.

    python examples/neutra_hmc.py [--dim 2] [--steps 1000] [--samples 2000] [--out out/neutra_hmc]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormalizingFlow  # noqa: E402
from pyro.infer.reparam import NeuTraReparam  # noqa: E402
from pyro.ops.stats import effective_sample_size  # noqa: E402

import pyro_cnf  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.training import progress_loop  # noqa: E402

GUIDE = PRESETS["guide"]

Z1_SCALE = 3.0


def model(dim: int) -> None:
    z1 = pyro.sample("z1", dist.Normal(0.0, Z1_SCALE))
    scale = torch.exp(z1 / 2).unsqueeze(-1).expand(*z1.shape, dim - 1)  # z1 may carry particles
    pyro.sample("z2", dist.Normal(0.0, scale).to_event(1))


def log_density(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The (z1, z2) marginal's log-density (any one of the z2..zD)."""
    return dist.Normal(0.0, Z1_SCALE).log_prob(z1) + dist.Normal(0.0, torch.exp(z1 / 2)).log_prob(z2)


def parse_solver(spec: str) -> dict:
    """``dopri5``, ``dopri5@1e-3``, ``rk4x4`` or ``dopri5x2`` -> ContinuousFlow settings."""
    match = re.fullmatch(r"([a-z0-9_]+?)(?:x(\d+))?(?:@([0-9.eE+-]+))?", spec)
    if not match:
        raise ValueError(f"bad solver {spec!r}: expected e.g. dopri5, dopri5@1e-3, rk4x4, dopri5x2")
    method, steps, tol = match.groups()
    settings: dict = {"method": method, "steps": int(steps) if steps else None}
    if tol:
        settings["rtol"] = settings["atol"] = float(tol)
    return settings


@contextlib.contextmanager
def solver(flow: pyro_cnf.ContinuousFlow, settings: dict) -> Iterator[None]:
    """Run ``flow`` with other solver settings for a while (validated together)."""
    saved = {key: getattr(flow, key) for key in settings}
    flow.configure(**settings)
    try:
        yield
    finally:
        flow.configure(**saved)


def train_guide(dim: int, args: argparse.Namespace) -> tuple[AutoNormalizingFlow, float]:
    """An ``AutoNormalizingFlow`` CNF guide trained by SVI; returns it and the CPU seconds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    target = partial(model, dim)
    make = partial(pyro_cnf.cnf, hidden_dims=args.hidden, **parse_solver(args.train_solver))
    guide = AutoNormalizingFlow(target, make)
    svi = SVI(target, guide, pyro.optim.ClippedAdam({"lr": args.lr, "lrd": args.lrd}),
              Trace_ELBO(num_particles=args.particles, vectorize_particles=True))
    start = time.process_time()
    progress_loop(lambda i: {"loss": svi.step()}, args.steps, desc="SVI, CNF guide")
    return guide, time.process_time() - start


def ess(samples: torch.Tensor) -> torch.Tensor:
    """Bulk ESS of each coordinate of one chain's draws, shape (draws, D) -> (D,)."""
    return effective_sample_size(samples.unsqueeze(0), chain_dim=0, sample_dim=1)


def run_nuts(target, args: argparse.Namespace, to_model_space=None, counter=None) -> tuple[dict, dict]:
    """NUTS on ``target``: its metrics and its draws (``to_model_space`` maps NeuTra's
    base-space draws to the model's sites)."""
    pyro.set_rng_seed(args.seed + 1)
    kernel = NUTS(target, max_tree_depth=args.max_tree_depth)
    mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup, disable_progbar=not args.progress)
    wall, cpu = time.perf_counter(), time.process_time()
    mcmc.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    raw = mcmc.get_samples()
    draws = raw
    if to_model_space is not None:
        with torch.no_grad():  # the trace-free solve: these draws need no log-det
            draws = to_model_space(raw)
    z = torch.cat([draws["z1"].reshape(-1, 1), draws["z2"].reshape(len(draws["z1"]), -1)], -1)
    n_eff = ess(z)
    divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])
    result = {
        "wall_s": wall, "cpu_s": cpu, "ess_z1": n_eff[0].item(), "ess_min": n_eff.min().item(),
        "ess_min_per_cpu_s": n_eff.min().item() / cpu, "ess_z1_per_cpu_s": n_eff[0].item() / cpu,
        "ess_min_per_wall_s": n_eff.min().item() / wall,
        "divergences": divergences, "step_size": float(kernel.step_size),
        "z1_mean": z[:, 0].mean().item(), "z1_std": z[:, 0].std().item(),
    }
    if counter is not None:
        result["solves_per_draw"] = counter[0] / (args.samples + args.warmup)
    return result, {"model": z, "raw": raw}


def logdet_error(flow: pyro_cnf.ContinuousFlow, base_draws: torch.Tensor, n: int = 50) -> float:
    """max |log-det the solve integrates - log|det| of the map it computes| over ``n`` draws,
    one at a time as HMC solves them. The NeuTra chain targets ``p(T(z)) exp(ladj(z))``, so
    this bounds how far its draws' density is off: ``exp(error)``."""
    worst = 0.0
    for z in base_draws[:n]:
        z = z.detach().reshape(1, -1).requires_grad_(True)
        x, ladj = flow(z, reverse=True)
        rows = [torch.autograd.grad(x[0, k], z, retain_graph=True)[0][0] for k in range(x.shape[1])]
        worst = max(worst, (ladj[0] - torch.linalg.slogdet(torch.stack(rows))[1]).abs().item())
    return worst


def report(name: str, r: dict) -> None:
    extra = f"  solves/draw {r['solves_per_draw']:.1f}  log-det error {r['logdet_error']:.1e}" if "logdet_error" in r else ""
    print(f"{name:>24}: {r['cpu_s']:7.1f} CPU s  ESS z1 {r['ess_z1']:7.1f}  min {r['ess_min']:7.1f}  "
          f"min ESS per CPU s {r['ess_min_per_cpu_s']:6.2f}  divergences {r['divergences']:4d}  "
          f"z1 mean {r['z1_mean']:5.2f} std {r['z1_std']:4.2f}{extra}", flush=True)


def count_solves(flow: pyro_cnf.ContinuousFlow) -> list[int]:
    calls = [0]
    flow.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def plot(samples: dict[str, torch.Tensor], metrics: dict, path: Path) -> None:
    g1, g2 = torch.meshgrid(torch.linspace(-10, 10, 300), torch.linspace(-15, 15, 300), indexing="ij")
    logp = log_density(g1, g2)
    levels = (logp.max() - torch.tensor([12.0, 8.0, 5.0, 3.0, 1.5, 0.5])).tolist()
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, z) in zip(axes[0], samples.items()):
        ax.contour(g1, g2, logp, levels=levels, cmap="Greys", linewidths=0.8)
        ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.4, color="C3")
        m = metrics[name]
        ax.set(title=f"{name}\nmin ESS per CPU s {m['ess_min_per_cpu_s']:.2f}, {m['divergences']} divergent",
               xlim=(-10, 10), ylim=(-15, 15), xlabel="z1")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("z2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2, help="the funnel's dimension D")
    parser.add_argument("--steps", type=int, default=1000, help="SVI steps for the CNF guide")
    parser.add_argument("--particles", type=int, default=32, help="ELBO particles per SVI step")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"the CNF field's widths (default: the guide preset's, {GUIDE.field['hidden_dims']})")
    parser.add_argument("--lr", type=float, default=GUIDE.lr_range[1],
                        help="ClippedAdam's initial rate (default: the top of the guide preset's lr_range)")
    parser.add_argument("--lrd", type=float, default=None, help="per-step lr decay (default: to 1/10 over --steps)")
    parser.add_argument("--train-solver", default="dopri5", help="the CNF's solver during SVI (names as --solvers)")
    parser.add_argument("--warmup", type=int, default=500, help="NUTS warmup draws")
    parser.add_argument("--samples", type=int, default=2000, help="NUTS draws kept")
    parser.add_argument("--max-tree-depth", type=int, default=10)
    parser.add_argument("--solvers", nargs="+", default=["dopri5x2", "rk4x4", "midpointx4", "dopri5"],
                        help="solver settings of the CNF inside NUTS, one NeuTra run each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="Pyro's progress bar for NUTS")
    parser.add_argument("--out", type=Path, default=Path("out/neutra_hmc"))
    args = parser.parse_args(argv)
    if args.lrd is None:
        args.lrd = 0.1 ** (1 / max(args.steps, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {spec: parse_solver(spec) for spec in args.solvers}  # fail before any work
    target = partial(model, args.dim)
    metrics: dict = {"dim": args.dim, "warmup": args.warmup, "samples": args.samples}
    samples = {}

    result, draws = run_nuts(target, args)
    samples["plain NUTS"] = draws["model"]
    metrics["plain NUTS"] = result
    report("plain NUTS", result)

    guide, train_cpu_s = train_guide(args.dim, args)
    guide.eval()  # NUTS differentiates through the flow but does not train it: no training tolerance
    metrics["guide_train_cpu_s"] = train_cpu_s
    flow = guide.transform.flow
    counter = count_solves(flow)
    for spec, setting in settings.items():
        name = f"NeuTra CNF, {spec}"
        neutra = NeuTraReparam(guide)
        counter[0] = 0
        with solver(flow, setting):
            result, draws = run_nuts(poutine.reparam(target, config=lambda _: neutra), args,
                                     to_model_space=lambda d: neutra.transform_sample(d["z1_shared_latent"]),
                                     counter=counter)
            result["logdet_error"] = logdet_error(flow, draws["raw"]["z1_shared_latent"])
        samples[name] = draws["model"]
        result["ess_min_per_cpu_s_with_training"] = result["ess_min"] / (result["cpu_s"] + train_cpu_s)
        metrics[name] = result
        report(name, result)

    plot(samples, metrics, args.out / "samples.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
