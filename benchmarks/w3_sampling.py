"""W3: drawing samples (base -> data, no log-det) on the shared W1 field."""

from __future__ import annotations

import copy

import torch

import pyro_cnf
from common import Counted, interleaved, median, perturbed_field, table


def run_w3(dims, n: int, repeats: int, rk4_steps: int = 8, log=print) -> list[dict]:
    from zuko.distributions import DiagNormal, NormalizingFlow
    from zuko.transforms import FreeFormJacobianTransform

    rows = []
    for d in dims:
        field = perturbed_field(d)
        counted = Counted(field)
        zuko_flow = NormalizingFlow(FreeFormJacobianTransform(counted, 0.0, 1.0, atol=1e-5, rtol=1e-5),
                                    DiagNormal(torch.zeros(d), torch.ones(d)))
        dopri = pyro_cnf.ContinuousFlow(field, rtol=1e-5, atol=1e-5)
        rk4 = pyro_cnf.ContinuousFlow(field, method="rk4", steps=rk4_steps)
        cases = {
            "pyro_cnf dopri5": lambda: dopri(torch.randn(n, d), reverse=True, logdet=False)[0],
            f"pyro_cnf rk4 x{rk4_steps}": lambda: rk4(torch.randn(n, d), reverse=True, logdet=False)[0],
            "zuko rsample": lambda: zuko_flow.rsample((n,)),
        }
        # Accuracy on common base points against float64 at 1e-10.
        z = torch.randn(n, d, generator=torch.Generator().manual_seed(d))
        ref_flow = pyro_cnf.ContinuousFlow(copy.deepcopy(field).double(), rtol=1e-10, atol=1e-10,
                                           options={"max_num_steps": 100_000})
        with torch.no_grad():
            ref = ref_flow(z.double(), reverse=True, logdet=False)[0]
            counted.calls = 0
            got = {
                "pyro_cnf dopri5": (dopri(z, reverse=True, logdet=False)[0], lambda: dopri.nfe),
                f"pyro_cnf rk4 x{rk4_steps}": (rk4(z, reverse=True, logdet=False)[0], lambda: rk4.nfe),
                "zuko rsample": (zuko_flow.transform.inv(z), lambda: counted.calls),
            }
            info = {k: dict(nfe=nfe(), err=(x.double() - ref).abs().max().item()) for k, (x, nfe) in got.items()}
            times = interleaved(cases, repeats)
        zuko_rate = n / median(times["zuko rsample"])
        for key in cases:
            rate = n / median(times[key])
            rows.append(dict(d=d, impl=key, samples_per_s=rate, ms=1e3 * median(times[key]), nfe=info[key]["nfe"],
                             err=info[key]["err"], vs_zuko=rate / zuko_rate))
            log(f"  d={d} {key:18s} {rate:10.0f} samples/s  NFE {info[key]['nfe']}  max err {info[key]['err']:.1e}"
                f"  {rate / zuko_rate:.2f}x zuko")
    return rows


def w3_table(rows: list[dict], n: int) -> str:
    return (f"{n} samples per call, tolerance 1e-5 for the adaptive solvers; max |x - x_ref| over the "
            "samples against float64 dopri5 at 1e-10 from the same base points.\n\n"
            + table(["d", "impl", "samples/s", "ms/call", "NFE", "max abs err", "x zuko"],
                    [[r["d"], r["impl"], r["samples_per_s"], r["ms"], r["nfe"], r["err"], r["vs_zuko"]] for r in rows]))
