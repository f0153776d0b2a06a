"""The first step of adaptive solves: evaluations and error on new, random and trained fields.

    python benchmarks/initial_step.py [--out out/bench/initial_step]

Every field is solved data -> base with the exact trace (log-density) and base -> data
without it (sampling), at rtol = atol = 1e-5 and 1e-3, batch 1024, by pyro_cnf's dopri5
with the rule of :func:`pyro_cnf.ode.rk.initial_step`, with the fixed first step ``T / 10``
of earlier versions, and by zuko's solver on the same field (its first trial is the whole
interval). Errors are maximum absolute errors against a float64 solve at 1e-11.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import pyro_cnf
from common import normal_log_prob, perturbed_field, table
from pyro_cnf.presets import PRESETS
from pyro_cnf.training import Trainer

TOLS = (1e-5, 1e-3)
N = 1024
#: A field without gains or scale rate (the "density_fixed_grid" preset's).
UNGAINED = PRESETS["density_fixed_grid"].field


def trained_fields(log=print) -> dict[str, torch.nn.Module]:
    """Fields after a short training: maximum likelihood of the "density_fixed_grid" preset at
    its rate, trained at rtol = atol = 1e-5 (8 Gaussians, 50 and 300 Adam steps; checkerboard
    300 steps), and flow matching by the "flow_matching" preset's recipe (checkerboard,
    3000 steps of its batch size)."""
    from pyro_cnf.toy import datasets
    from trainers import build_fm

    out = {}
    for name, data, steps in (("MLE 8gaussians 50", "8gaussians", 50), ("MLE 8gaussians 300", "8gaussians", 300),
                              ("MLE checkerboard 300", "checkerboard", 300)):
        torch.manual_seed(0)
        flow = pyro_cnf.default_flow(2, preset="density_fixed_grid", rtol=1e-5, atol=1e-5)
        trainer = Trainer(flow, lambda i, data=data: datasets.sample(data, 512, seed=i).float(), disable=True)
        trainer.fit(steps)
        out[name] = flow.vector_field
        log(f"  trained {name}: loss {trainer.history[-1]['loss']:.3f}")
    torch.manual_seed(0)
    fm = build_fm(2, {"batches": 1})
    batch = PRESETS["flow_matching"].training["batch_size"]
    Trainer(fm.module, lambda i: datasets.sample("checkerboard", batch, seed=i).float(), fm.objective, lr=fm.lr,
            schedule=fm.schedule, disable=True).fit(3000)
    out["FM checkerboard 3000"] = fm.module.vector_field
    return out


def fields(log=print) -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)
    out = {"zero-initialised d=2": pyro_cnf.ODENet(2, **UNGAINED),
           "new random d=2": pyro_cnf.ODENet(2, **UNGAINED, zero_init=False),
           "new random d=64": pyro_cnf.ODENet(64, **UNGAINED, zero_init=False)}
    out.update({f"W1 field d={d}": perturbed_field(d) for d in (2, 8, 64)})
    torch.manual_seed(1)  # ODENet's defaults since the gains: the first layer starts sharper
    out.update({f"new random d={d}, default gains": pyro_cnf.ODENet(d, zero_init=False) for d in (2, 64)})
    out.update(trained_fields(log))
    return {k: v.requires_grad_(False) for k, v in out.items()}


def run(log=print) -> list[dict]:
    rows = []
    for name, field in fields(log).items():
        d = field.input_dim
        g = torch.Generator().manual_seed(3)
        x = torch.randn(N, d, generator=g) * (2.0 if d == 2 else 1.0)  # data scale of the 2-D toys
        z = torch.randn(N, d, generator=g)
        ref_field = copy.deepcopy(field).double()
        ref = pyro_cnf.ContinuousFlow(ref_field, trace="exact", rtol=1e-11, atol=1e-11, options={"max_num_steps": 10**5})
        with torch.no_grad():
            ref_lp = ref.log_prob(x.double())
            ref_x = ref(z.double(), reverse=True, logdet=False)[0]
        for tol in TOLS:
            solvers = {"pyro_cnf": {}, "pyro_cnf, first step T/10": {"first_step": 0.1}}
            for label, options in solvers.items():
                flow = pyro_cnf.ContinuousFlow(field, trace="exact", rtol=tol, atol=tol, options=options)
                with torch.no_grad():
                    lp_err = (flow.log_prob(x).double() - ref_lp).abs()
                    nfe_lp = flow.nfe
                    sx = flow(z, reverse=True, logdet=False)[0]
                    nfe_s = flow.nfe
                rows.append(dict(field=name, tol=tol, solver=label, nfe_log_prob=nfe_lp, err_log_prob=lp_err.max().item(),
                                 nfe_sample=nfe_s, err_sample=(sx.double() - ref_x).abs().max().item()))
            rows.append(dict(field=name, tol=tol, solver="zuko", **zuko_costs(field, x, z, tol, ref_lp, ref_x)))
            for r in rows[-len(solvers) - 1:]:
                log(f"  {name:22s} tol {tol:g} {r['solver']:26s} log_prob NFE {r['nfe_log_prob']:3d} err "
                    f"{r['err_log_prob']:.1e}   sample NFE {r['nfe_sample']:3d} err {r['err_sample']:.1e}")
    return rows


def zuko_costs(field, x, z, tol, ref_lp, ref_x) -> dict:
    from zuko.transforms import FreeFormJacobianTransform

    calls = [0]

    def f(t, y):
        calls[0] += 1
        return field(t, y)

    transform = FreeFormJacobianTransform(f, 0.0, 1.0, phi=(), atol=tol, rtol=tol, exact=True)
    with torch.no_grad():
        y, ladj = transform.call_and_ladj(x)
        lp = normal_log_prob(y) + ladj
        nfe_lp, calls[0] = calls[0], 0
        sx = transform.inv(z)
    return dict(nfe_log_prob=nfe_lp, err_log_prob=(lp.double() - ref_lp).abs().max().item(),
                nfe_sample=calls[0], err_sample=(sx.double() - ref_x).abs().max().item())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench/initial_step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    cols = ["field", "tol", "solver", "nfe_log_prob", "err_log_prob", "nfe_sample", "err_sample"]
    body = table(cols, [[r[c] for c in cols] for r in rows])
    report = f"Command: `python benchmarks/initial_step.py {' '.join(sys.argv[1:])}`\n\n" + body
    (out / "report.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
