"""W3: drawing samples (base -> data, no log-det) on the shared W1 field."""

from __future__ import annotations

import copy

import torch

import pyro_cnf
from common import Counted, interleaved, median, perturbed_field, table


#: pyro_cnf settings timed against zuko: adaptive (tolerance, error norm) and fixed-grid step counts.
DOPRI = ((1e-4, "mixed"), (1e-5, "mixed"), (1e-6, "mixed"), (1e-5, "per_sample"), (1e-6, "per_sample"))
RK4_STEPS = (4, 5, 6, 8, 10, 12)
DOPRI5_STEPS = (3, 4, 5, 6)


def run_w3(dims, n: int, repeats: int, log=print) -> list[dict]:
    from zuko.distributions import DiagNormal, NormalizingFlow
    from zuko.transforms import FreeFormJacobianTransform

    rows = []
    for d in dims:
        field = perturbed_field(d)
        counted = Counted(field)
        zuko_flow = NormalizingFlow(FreeFormJacobianTransform(counted, 0.0, 1.0, atol=1e-5, rtol=1e-5),
                                    DiagNormal(torch.zeros(d), torch.ones(d)))
        flows = {f"pyro_cnf dopri5 {tol:.0e}{' per-sample' if norm == 'per_sample' else ''}":
                 pyro_cnf.ContinuousFlow(field, rtol=tol, atol=tol, error_norm=norm) for tol, norm in DOPRI}
        flows.update({f"pyro_cnf rk4 x{k}": pyro_cnf.ContinuousFlow(field, method="rk4", steps=k) for k in RK4_STEPS})
        flows.update({f"pyro_cnf dopri5 x{k}": pyro_cnf.ContinuousFlow(field, steps=k) for k in DOPRI5_STEPS})
        cases = {key: (lambda f=f: f(torch.randn(n, d), reverse=True, logdet=False)[0]) for key, f in flows.items()}
        cases["zuko rsample"] = lambda: zuko_flow.rsample((n,))
        # Accuracy on common base points against float64 at 1e-10.
        z = torch.randn(n, d, generator=torch.Generator().manual_seed(d))
        ref_flow = pyro_cnf.ContinuousFlow(copy.deepcopy(field).double(), rtol=1e-10, atol=1e-10,
                                           options={"max_num_steps": 100_000})
        with torch.no_grad():
            ref = ref_flow(z.double(), reverse=True, logdet=False)[0]
            info = {}
            for key, f in flows.items():
                x = f(z, reverse=True, logdet=False)[0]
                err = (x.double() - ref).abs()
                info[key] = dict(nfe=f.nfe, err=err.max().item(), err_mean=err.mean().item())
            counted.calls = 0
            x = zuko_flow.transform.inv(z)
            err = (x.double() - ref).abs()
            info["zuko rsample"] = dict(nfe=counted.calls, err=err.max().item(), err_mean=err.mean().item())
            times = interleaved(cases, repeats)
        zuko_rate = n / median(times["zuko rsample"])
        for key in cases:
            rate = n / median(times[key])
            rows.append(dict(d=d, impl=key, samples_per_s=rate, ms=1e3 * median(times[key]), nfe=info[key]["nfe"],
                             err=info[key]["err"], err_mean=info[key]["err_mean"], vs_zuko=rate / zuko_rate))
            log(f"  d={d} {key:22s} {rate:10.0f} samples/s  NFE {info[key]['nfe']}  max err {info[key]['err']:.1e}"
                f"  {rate / zuko_rate:.2f}x zuko")
    return rows


def equal_error(rows: list[dict], d: int, key: str = "err") -> tuple[dict, dict | None]:
    """zuko's row at ``d`` and the fastest pyro_cnf row whose error (``"err"``: max,
    ``"err_mean"``: mean over all coordinates) is at most zuko's."""
    zuko = next(r for r in rows if r["d"] == d and r["impl"] == "zuko rsample")
    ok = [r for r in rows if r["d"] == d and r["impl"].startswith("pyro_cnf") and r[key] <= zuko[key]]
    return zuko, max(ok, key=lambda r: r["samples_per_s"], default=None)


def w3_table(rows: list[dict], n: int) -> str:
    lines = []
    for d in sorted({r["d"] for r in rows}):
        for key, what in (("err", "max"), ("err_mean", "mean")):
            zuko, mine = equal_error(rows, d, key)
            lines.append(f"- d = {d}: " + (
                f"fastest pyro_cnf setting at <= zuko's {what} error ({zuko[key]:.1e}): {mine['impl']}, "
                f"{mine['vs_zuko']:.2f}x zuko's samples/s (error {mine[key]:.1e})" if mine else
                f"no pyro_cnf setting reached zuko's {what} error {zuko[key]:.1e}"))
    return (f"{n} samples per call (base -> data, no log-det); zuko at tolerance 1e-5; max |x - x_ref| over the "
            "samples against float64 dopri5 at 1e-10 from the same base points.\n\n"
            + table(["d", "impl", "samples/s", "ms/call", "NFE", "max abs err", "mean abs err", "x zuko"],
                    [[r["d"], r["impl"], r["samples_per_s"], r["ms"], r["nfe"], r["err"], r["err_mean"], r["vs_zuko"]]
                     for r in rows])
            + "\n\nAt equal accuracy:\n\n" + "\n".join(lines))
