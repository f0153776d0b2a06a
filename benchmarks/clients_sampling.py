"""Sampling through the adapters: what ``Flow.sample`` (nflows) and
``TransformedDistribution.sample`` (Pyro) cost against the trace-free solve they need.

    python benchmarks/clients_sampling.py [--samples 10000] [--budget 20] [--repeats 5]

Trains the field of the flow-matching recipe (``trainers.FM_RECIPE``, the "flow_matching"
preset's) on 8 Gaussians for ``--budget`` CPU seconds, then times each way of drawing
``--samples`` points with the flow's default solver (dopri5, rtol = atol = 1e-5): medians
of interleaved repeats, process CPU time, one torch thread. Writes ``report.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pyro.distributions as dist
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import interleaved, machine, median, table  # noqa: E402
from pyro_cnf import CNF, CNFFlow, CNFTransform, ContinuousFlow  # noqa: E402
from pyro_cnf.toy.datasets import sample  # noqa: E402
from trainers import BATCH, FM_RECIPE, recipe_text, train  # noqa: E402


def trained_field(budget: float, seed: int, recipe: dict) -> torch.nn.Module:
    """The field of the ``pyro_cnf_fm`` run with ``recipe`` after ``budget`` CPU seconds on 8 Gaussians."""
    keep: dict = {}
    test = sample("8gaussians", 2000, seed=10**6)
    train("pyro_cnf_fm", 2, lambda i: sample("8gaussians", BATCH, seed=seed + i), budget, test, test[:512],
          seed=seed, evaluate=False, keep=keep, log=lambda msg: None, recipe=recipe)
    field = keep["field"].eval()
    return field.requires_grad_(False)


def cases(field: torch.nn.Module, n: int) -> tuple[dict, dict]:
    d = field.input_dim
    flow = ContinuousFlow(field).eval()
    base = dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1)
    plain = Flow(CNFTransform(d, flow=flow), StandardNormal([d]))
    trace_free = CNFFlow(CNFTransform(d, flow=flow), StandardNormal([d]))
    lazy = CNF(d, flow=flow)
    eager = CNF(d, flow=flow)
    eager.trace_free_without_grad = False  # the behaviour before: the trace in every _call

    def pyro_sample_then_log_prob():
        d_ = dist.TransformedDistribution(base, [lazy])
        x = d_.sample((n,))
        with torch.no_grad():
            return d_.log_prob(x)

    runs = {
        "flow(z, reverse=True, logdet=False)": lambda: flow(torch.randn(n, d), reverse=True, logdet=False),
        "flow(z, reverse=True) (with the trace)": lambda: flow(torch.randn(n, d), reverse=True),
        "nflows Flow.sample (plain Flow: inverse with log-det)": lambda: plain.sample(n),
        "nflows CNFFlow.sample": lambda: trace_free.sample(n),
        "Pyro TransformedDistribution.sample (trace_free_without_grad=False: before)":
            lambda: dist.TransformedDistribution(base, [eager]).sample((n,)),
        "Pyro TransformedDistribution.sample": lambda: dist.TransformedDistribution(base, [lazy]).sample((n,)),
        "Pyro sample() then log_prob of those samples": pyro_sample_then_log_prob,
    }
    nfe = {}
    with torch.no_grad():
        z = torch.randn(n, d)
        flow(z, reverse=True, logdet=False)
        nfe["trace-free"] = flow.nfe
        flow(z, reverse=True)
        nfe["with trace"] = flow.nfe
    return runs, nfe


def check_log_prob_of_a_sample(field: torch.nn.Module, n: int = 2000) -> dict:
    """max |log_prob of a sample() point - log_prob of the same point scored afresh (data ->
    base)|, with the log-det integrated on demand (``lazy``) and, as before, in the drawing
    solve (``eager``): both differ from the fresh score by the solver's error alone."""
    d = field.input_dim
    gaps = {}
    for name, trace_free in (("lazy", True), ("eager", False)):
        transform = CNF(d, flow=ContinuousFlow(field).eval())
        transform.trace_free_without_grad = trace_free
        d_ = dist.TransformedDistribution(dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1), [transform])
        torch.manual_seed(0)
        with torch.no_grad():
            x = d_.sample((n,))
            served = d_.log_prob(x)
            fresh = d_.log_prob(x.clone())  # not the cached tensor: one data -> base solve
        gaps[name] = (served - fresh).abs().max().item()
    return gaps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--budget", type=float, default=20.0, help="CPU seconds of flow-matching training")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, nargs="+", default=list(FM_RECIPE["hidden_dims"]),
                   help="the field's widths (default: the recipe's, %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_clients_sampling")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {**FM_RECIPE, "hidden_dims": tuple(args.hidden)}
    field = trained_field(args.budget, args.seed, recipe)
    runs, nfe = cases(field, args.samples)
    times = interleaved(runs, args.repeats)
    ref = median(times["flow(z, reverse=True, logdet=False)"])
    rows = [[name, 1e3 * median(t), median(t) / ref] for name, t in times.items()]
    gap = check_log_prob_of_a_sample(field)
    report = (
        f"# Sampling through the adapters\n\nCommand: `python benchmarks/clients_sampling.py {' '.join(argv or sys.argv[1:])}`"
        f"  \nMachine: {machine()}\n\nField: the flow-matching recipe's ({recipe_text(recipe)}), "
        f"trained {args.budget:g} CPU s on 8 Gaussians; solver: ContinuousFlow defaults (dopri5, rtol = atol = 1e-5); "
        f"NFE trace-free {nfe['trace-free']}, with the trace {nfe['with trace']}. {args.samples} points per call, "
        f"median of {args.repeats} interleaved repeats (process CPU time).\n\n"
        + table(["path", "ms", "x trace-free solve"], rows)
        + f"\n\nlog_prob of 2000 sample() points vs the same points scored afresh (data -> base): max |difference| "
        f"{gap['lazy']:.2e} nats with the log-det integrated on demand, {gap['eager']:.2e} with it integrated in the "
        "drawing solve (before): the solver's error either way.\n"
    )
    print(report)
    results = {"args": vars(args), "nfe": nfe, "ms": {k: 1e3 * median(t) for k, t in times.items()},
               "ratio": {k: median(t) / ref for k, t in times.items()}, "log_prob_gap": gap}
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
