"""W1: log_prob throughput on one shared field, every implementation, both trace modes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common import interleaved, median, perturbed_field, reference_log_prob, table
from peers import LogProb, make_log_prob, pyro_cnf_log_prob

TRACES = ("exact", "hutchinson")
#: Tolerances pyro_cnf is run at to compare with each peer at equal error.
TOL_LADDER = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)


def raw_costs(field: nn.Module, x: Tensor, repeats: int, vjp_exact: bool = True,
              paired: dict[str, LogProb] | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """CPU ms of one evaluation of the field plus its divergence, the physical floor of
    one NFE: closed form; field + batched VJP over the identity (exact); field + one VJP
    (Hutchinson); and the field alone (medians). The ``paired`` log_prob cases join the
    same interleaved rounds; the second dict holds every case's ms per round (floors per
    evaluation, paired cases per call), so that a call's ms per NFE can be divided by the
    floor of the same round."""
    t = torch.tensor(0.5)
    basis = torch.eye(x.shape[1]).unsqueeze(1).expand(x.shape[1], *x.shape)
    noise = torch.randint(0, 2, x.shape).float() * 2 - 1

    def with_vjp(cotangent: Tensor, batched: bool):
        def run():
            with torch.enable_grad():
                xg = x.detach().requires_grad_()
                f = field(t, xg)
                torch.autograd.grad(f, xg, cotangent, is_grads_batched=batched)
        return run

    loops = 10  # several evaluations per timing: one is shorter than the clock's grain

    def many(fn):
        return lambda: [fn() for _ in range(loops)]

    with torch.no_grad():
        cases = {
            "closed": many(lambda: field.divergence(t, x)),
            "hutchinson": many(with_vjp(noise, False)),
            "field": many(lambda: field(t, x)),
        }
        if vjp_exact:  # seconds per evaluation at d >= 128, and no row there needs it
            cases["exact"] = many(with_vjp(basis, True))
        if hasattr(field, "jvp"):  # forward-mode Hutchinson without autograd
            cases["jvp"] = many(lambda: field.jvp(t, x, noise))
        floors = set(cases)
        cases.update({("paired", k): (lambda c=c: c.fn(x)) for k, c in (paired or {}).items()})
        times = interleaved(cases, repeats)
    rounds = {(k[1] if isinstance(k, tuple) else k): [1e3 * v / (1 if isinstance(k, tuple) else loops) for v in vs]
              for k, vs in times.items()}
    return {k: median(v) for k, v in rounds.items() if k in floors}, rounds


def _floor_kind(case: LogProb, field: nn.Module) -> str:
    """The raw evaluation an NFE of this implementation cannot be cheaper than."""
    if case.impl in ("pyro_cnf", "pyro_cnf_tdq") and case.trace == "exact":
        return "closed"
    if case.impl in ("pyro_cnf", "pyro_cnf_tdq") and hasattr(field, "jvp"):
        return "jvp"
    return case.trace


def run_w1(dims, impls, repeats: int, batch: int = 1024, rtol: float = 1e-5, big_dims=(128, 256),
           match_error: bool = True, log=print) -> dict:
    """Returns ``{"rows": [...], "raw": {d: {...}}}``; each row one (d, trace, impl)."""
    results = {"rows": [], "raw": {}, "matched": []}
    for d in list(dims) + [b for b in big_dims if b not in dims]:
        only_pyro = d in big_dims and d not in dims
        torch.manual_seed(d)
        field = perturbed_field(d)
        x = torch.randn(batch, d)
        ref = reference_log_prob(field, x)
        cases: dict[str, LogProb] = {}
        for trace in TRACES:
            for impl in impls:
                if only_pyro and impl != "pyro_cnf":
                    continue
                if impl == "pyro_cnf_vjp" and trace == "hutchinson":
                    continue  # the same computation as pyro_cnf's Hutchinson
                try:
                    cases[f"{impl}/{trace}"] = make_log_prob(impl, field, trace, rtol, rtol)
                except ImportError as error:
                    log(f"  skipping {impl}: {error}")
        info = {}
        with torch.no_grad():
            for key, case in cases.items():  # one untimed call each: NFE, error, warm-up
                logp, nfe = case.fn(x)
                err = (logp.double() - ref).abs()
                info[key] = dict(nfe=nfe, err=err.mean().item(), err_max=err.max().item())
            # A single call of the slowest peers takes seconds; fewer repeats there.
            times = interleaved({k: (lambda c=c: c.fn(x)) for k, c in cases.items()}, repeats, warmup=False)
        # The floor is cheap and needs many rounds; pyro_cnf's own calls (fast) join them, so
        # that its ms/NFE over the floor compares two timings taken under the same load.
        mine = {k: c for k, c in cases.items() if c.impl == "pyro_cnf"}
        raw, rounds = raw_costs(field, x, max(5 * repeats, 15), vjp_exact=not only_pyro, paired=mine)
        results["raw"][d] = raw
        for key, case in cases.items():
            ms = 1e3 * median(times[key])
            nfe = info[key]["nfe"]
            kind = _floor_kind(case, field)
            floor = raw[kind]
            # Paired: each round's call over the same round's floor, then the median.
            over = (median([c / nfe / f for c, f in zip(rounds[key], rounds[kind])]) if key in mine
                    else ms / nfe / floor)
            row = dict(d=d, impl=case.impl, trace=case.trace, tol=rtol, ms=ms, nfe=nfe, ms_per_nfe=ms / nfe,
                       floor_ms=floor, err=info[key]["err"], err_max=info[key]["err_max"], over_floor=over)
            results["rows"].append(row)
            log(f"  d={d:4d} {key:24s} {ms:9.1f} ms  nfe {nfe:4d}  {ms / nfe:7.3f} ms/nfe "
                f"(floor {floor:.3f})  err {row['err']:.2e}")
        if match_error and not only_pyro:
            results["matched"] += _matched(field, x, ref, d, results["rows"], repeats, log)
    return results


def _matched(field, x, ref, d, rows, repeats, log) -> list[dict]:
    """Equal-error comparison of the exact trace: pyro_cnf (closed form) over a ladder of
    tolerances and both error norms; for each exact peer, the fastest pyro_cnf setting
    whose mean error is at most the peer's. (Hutchinson errors are dominated by the
    estimator's variance, not the solver's, so they are compared at the common tolerance.)"""
    peers = [r for r in rows if r["d"] == d and r["trace"] == "exact" and not r["impl"].startswith("pyro_cnf")]
    if not peers:
        return []
    ladder = []
    with torch.no_grad():
        cases = {}
        for tol in TOL_LADDER:
            for norm in ("mixed", "per_sample"):
                case = pyro_cnf_log_prob(field, "exact", tol, tol, error_norm=norm)
                logp, nfe = case.fn(x)
                err = (logp.double() - ref).abs().mean().item()
                ladder.append(dict(tol=tol, norm=norm, nfe=nfe, err=err))
                cases[(tol, norm)] = lambda c=case: c.fn(x)
        times = interleaved(cases, repeats, warmup=False)
    for entry in ladder:
        entry["ms"] = 1e3 * median(times[(entry["tol"], entry["norm"])])
    out = []
    for peer in peers:
        ok = [e for e in ladder if e["err"] <= peer["err"]]
        mine = min(ok, key=lambda e: e["ms"]) if ok else None
        out.append(dict(d=d, peer=peer["impl"], peer_ms=peer["ms"], peer_err=peer["err"], peer_nfe=peer["nfe"],
                        tol=mine["tol"] if mine else float("nan"), norm=mine["norm"] if mine else "none reached",
                        ms=mine["ms"] if mine else float("nan"), nfe=mine["nfe"] if mine else 0,
                        err=mine["err"] if mine else float("nan"),
                        ratio=mine["ms"] / peer["ms"] if mine else float("nan")))
        log(f"  d={d:4d} equal error vs {peer['impl']:10s} ({peer['ms']:.1f} ms, err {peer['err']:.2e}): "
            + (f"pyro_cnf {mine['norm']} tol {mine['tol']:.0e} {mine['ms']:.1f} ms err {mine['err']:.2e} "
               f"ratio {out[-1]['ratio']:.2f}" if mine else "no pyro_cnf setting reached that error"))
    return out


def w1_tables(results: dict) -> str:
    rows = results["rows"]
    out = []
    headers = ["d", "impl", "trace", "tol", "ms/call", "NFE", "ms/NFE", "floor ms", "ms/NFE ÷ floor",
               "mean abs err", "max abs err"]
    out.append(table(headers, [
        [r["d"], r["impl"], r["trace"], r["tol"], r["ms"], r["nfe"], r["ms_per_nfe"], r["floor_ms"],
         r["over_floor"], r["err"], r["err_max"]] for r in rows])
        + "\n\nms/NFE ÷ floor: for the `pyro_cnf` rows the median over the floor's interleaved rounds of "
        "(that round's call / NFE) ÷ (that round's floor); other rows: ms/NFE of the table over the floor.")
    raw_rows = [[d, v["field"], v["closed"], v.get("exact", float("nan")), v["hutchinson"], v.get("jvp", float("nan"))]
                for d, v in results["raw"].items()]
    out.append("Raw cost of one evaluation (ms, batch 1024): field alone; field + closed-form divergence; "
               "field + batched VJP over the identity (exact); field + one VJP (Hutchinson); field + one "
               "closed-form JVP (ODENet.jvp, pyro_cnf's Hutchinson)\n\n"
               + table(["d", "field", "field+closed div", "field+d VJPs", "field+1 VJP", "field+1 JVP"], raw_rows))
    if results.get("matched"):
        out.append("Exact trace at equal error: for each peer, the fastest pyro_cnf setting (tolerance, error "
                   "norm) whose mean error is at most the peer's\n\n" + table(
            ["d", "peer", "peer ms", "peer NFE", "peer err", "pyro_cnf norm", "tol", "ms", "NFE", "err",
             "ratio"],
            [[m["d"], m["peer"], m["peer_ms"], m["peer_nfe"], m["peer_err"], m["norm"], m["tol"], m["ms"],
              m["nfe"], m["err"], m["ratio"]] for m in results["matched"]]))
    return "\n\n".join(out)
