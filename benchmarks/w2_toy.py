"""W2: 2-D toy densities, every run under the same CPU budget, one exact evaluator."""

from __future__ import annotations

import math
from dataclasses import asdict


from common import table
from trainers import BATCH, RUNS, solver_costs, time_to_reach, train

DEFAULT_RUNS = ("pyro_cnf_dopri5", "pyro_cnf_dopri5x3", "pyro_cnf_dopri5_rnode", "pyro_cnf_dopri5x2",
                "pyro_cnf_dopri5x2_rnode", "pyro_cnf_fm", "zuko", "torchdyn", "maf")
CNF_PEERS = ("zuko", "torchdyn")
#: The runs trained by maximum likelihood through the ODE solve.
MLE_CNFS = ("pyro_cnf_dopri5", "pyro_cnf_dopri5x3", "pyro_cnf_dopri5_rnode", "pyro_cnf_dopri5x2",
            "pyro_cnf_dopri5x2_rnode", "pyro_cnf_rk4", "pyro_cnf_rk4_rnode", "pyro_cnf_hutch", "zuko", "torchdyn")
#: The RNODE target: a regularised run's solver NFE at the end of training at most this
#: fraction of the unregularised default's, at a held-out NLL at most RNODE_NLL worse; and the
#: run's log-density on its own solver within RNODE_NLL of the exact evaluator, else its NFE
#: buys a different model than the one scored.
RNODE_NFE, RNODE_NLL = 0.5, 0.05
TEST_SEED = 10**6
#: Where the flow-matching run's held-out NLL curve is recorded, as fractions of the budget
#: (evaluated on the first N_CURVE test points; not counted in the budget).
CURVE_FRACTIONS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75)
N_CURVE = 2000
#: The flow-matching speed target: flow matching reaches the best MLE CNF peer's budget-end NLL within this
#: fraction of that peer's CPU time.
REACH_TARGET = 0.2


def toy_data():
    """``(sample(name, n, seed), true_log_prob(name, x) or None)``: pyro_cnf.toy.datasets."""
    from pyro_cnf.toy import datasets

    return datasets.sample, datasets.true_log_prob


def run_w2(names, runs, budget: float, n_test: int = 20_000, seed: int = 0, log=print) -> dict:
    sample, true_log_prob = toy_data()
    out = {}
    for name in names:
        k = sum(map(ord, name))  # seeds tied to the dataset, not to its place in the list
        test = sample(name, n_test, seed=TEST_SEED + k)
        true = true_log_prob(name, test)
        true_nll = -true.double().mean().item() if true is not None else math.nan
        log(f"  {name}: true NLL {true_nll:.3f}")
        results = []
        for run in runs:
            keep = {}
            fm = run == "pyro_cnf_fm"
            r = train(run, 2, lambda i, k=k: sample(name, BATCH, seed=seed + 7919 * (k + 1) + i), budget, test,
                      test[:1024], seed=seed, log=log, keep=keep, n_curve=N_CURVE,
                      curve_at=[f * budget for f in CURVE_FRACTIONS] if fm else ())
            log(f"  {name} {run}: NLL {r.nll:.3f} after {r.steps} steps; NFE {r.nfe_start} -> {r.nfe_end}")
            r = asdict(r)
            if fm and not r["failed"]:
                r["costs"] = solver_costs(keep["field"], test, 2)
                log(f"  {name} {run}: sampling NFE {r['costs']['sample_nfe']}; rk4 NLL "
                    + ", ".join(f"x{k}: {v:.3f}" for k, v in r["costs"]["rk4"].items()))
            results.append(r)
        out[name] = dict(true_nll=true_nll, runs=results)
    return out


def fm_targets(name: str, by: dict, unit: str = "") -> list[list[str]]:
    """The flow-matching targets for the ``pyro_cnf_fm`` run in ``by`` (run name -> result dict):
    rows ``[target, MET / NOT MET / -, measured]``."""
    fm = by.get("pyro_cnf_fm")
    if not fm or math.isnan(fm["nll"]):
        return []
    key = "nll_y" if "nll_y" in fm else "nll"
    met = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    rows = []
    maf = by.get("maf")
    if maf and not math.isnan(maf[key]):
        gap = maf[key] - fm[key]
        rows.append([f"flow matching, {name}: flow matching NLL below the 5-layer MAF's", met(gap > 0),
                     f"{fm[key]:.3f} vs {maf[key]:.3f}{unit} (margin {gap:+.3f})"])
    mle = {k: v for k, v in by.items() if k.partition("@")[0] in MLE_CNFS and not math.isnan(v[key])}
    if mle:
        best = min(mle.values(), key=lambda r: r[key])
        gap = best[key] - fm[key]
        rows.append([f"flow matching, {name}: flow matching NLL below every MLE-trained CNF's ({', '.join(mle)})",
                     met(gap > 0), f"{fm[key]:.3f} vs best {best['run']} {best[key]:.3f}{unit} (margin {gap:+.3f})"])
    if fm.get("nll_curve"):
        shift = fm[key] - fm["nll"]  # 0, or W4's change of variables to y
        peers = {k: v for k, v in mle.items() if k in CNF_PEERS}
        for label, pool, scored in (("MLE CNF peer", peers, True), ("MLE CNF (any library)", mle, False)):
            if not pool:
                continue
            best = min(pool.values(), key=lambda r: r["nll_subset"])
            target = best["nll_subset"] + shift
            curve = [(s, n, v + shift) for s, n, v in fm["nll_curve"]]
            reach = time_to_reach(curve, target)
            ratio = reach / best["cpu_s"]
            if reach == reach:
                step = next(n for s, n, _ in curve if s == reach)
                when = f"{reach:.1f} CPU s (step {step}) = {ratio:.3f}x of its {best['cpu_s']:.1f} s"
            else:
                when = f"not reached in {fm['cpu_s']:.1f} s"
            rows.append([f"flow matching, {name}: flow matching reaches the best {label}'s budget-end NLL in <= "
                         f"{REACH_TARGET:g}x its CPU time" + ("" if scored else " (for reference)"),
                         met(ratio <= REACH_TARGET) if scored else "-",
                         f"{best['run']} {target:.3f}{unit} on the first {fm['n_curve']} test points: {when}"])
    costs = fm.get("costs")
    if costs:
        rows.append([f"flow matching, {name}: flow matching sampling NFE (dopri5 1e-5) and NLL on a fixed rk4 grid", "-",
                     f"sampling NFE {costs['sample_nfe']}; NLL rk4 "
                     + ", ".join(f"x{k} {v:.3f}" for k, v in costs["rk4"].items()) + f" vs dopri5 1e-6 {fm['nll']:.3f}"])
    return rows


def w2_fm_targets(out: dict) -> list[list[str]]:
    return [row for name, res in out.items() for row in fm_targets(f"W2 {name}", {r["run"]: r for r in res["runs"]})]


def w2_verdicts(out: dict) -> list[str]:
    lines = []
    for name, res in out.items():
        by = {r["run"]: r for r in res["runs"]}
        dflt = by.get("pyro_cnf_dopri5")  # the unregularised default, adaptive dopri5
        mine = {k: v for k, v in by.items() if k.startswith("pyro_cnf") and not math.isnan(v["nll"])}
        peers = {k: v for k, v in by.items() if k in CNF_PEERS and not math.isnan(v["nll"])}
        if mine and peers:
            best = min(mine.values(), key=lambda r: r["nll"])
            worst_gap = min(p["nll"] - best["nll"] for p in peers.values())
            lines.append(f"{name}: best pyro_cnf run {best['run']} NLL {best['nll']:.3f} vs best CNF peer "
                         f"{min(peers.values(), key=lambda r: r['nll'])['run']} "
                         f"{min(p['nll'] for p in peers.values()):.3f}: "
                         f"{'MET' if worst_gap > 0 else 'NOT MET'} (margin {worst_gap:+.3f} nats)")
            if dflt:
                gap = min(p["nll"] - dflt["nll"] for p in peers.values())
                lines.append(f"{name}: default pyro_cnf (dopri5 MLE) NLL {dflt['nll']:.3f}: "
                             f"{'beats' if gap > 0 else 'does NOT beat'} every CNF peer (margin {gap:+.3f})")
        for reg_run, reg in by.items():
            if "_rnode" not in reg_run or not (dflt and dflt["train_nfe_end"]) or math.isnan(reg["nll"]):
                continue
            ratio = reg["train_nfe_end"] / dflt["train_nfe_end"]
            dnll = reg["nll"] - dflt["nll"]
            drift = abs(reg["nll_own"] - reg["nll"])
            ok = ratio <= RNODE_NFE and dnll <= RNODE_NLL and drift <= RNODE_NLL
            lines.append(f"{name}: RNODE ({reg_run}) solver NFE at the end of training {reg['train_nfe_end']} vs "
                         f"unregularised pyro_cnf_dopri5 {dflt['train_nfe_end']} (ratio {ratio:.2f}, target <= "
                         f"{RNODE_NFE}), NLL {reg['nll']:.3f} vs {dflt['nll']:.3f} (diff {dnll:+.3f}, target <= "
                         f"{RNODE_NLL}); on its own solver {reg['nll_own']:.3f} (off the exact evaluator by "
                         f"{drift:.3f}, must be <= {RNODE_NLL}); adaptive dopri5 1e-5 NFE of the trained field "
                         f"{reg['nfe_end']} vs {dflt['nfe_end']}: {'MET' if ok else 'NOT MET'}")
    return lines


def fm_tables(out: dict) -> str:
    """The flow-matching run's NLL curve and its solver costs, one row per dataset."""
    curves, costs = [], []
    for name, res in out.items():
        fm = next((r for r in res["runs"] if r["run"] == "pyro_cnf_fm"), None)
        if not fm:
            continue
        if fm.get("nll_curve"):
            curves.append(f"{name}: " + ", ".join(f"{s:g} s {v:.3f}" for s, _, v in fm["nll_curve"]))
        if fm.get("costs"):
            c = fm["costs"]
            costs.append([name, c["sample_nfe"], fm["nfe_end"] or "-", f"{fm['nll']:.3f}"]
                         + [f"{v:.3f}" for v in c["rk4"].values()])
    parts = []
    if curves:
        parts.append(f"Flow matching: held-out NLL on the first {N_CURVE} test points during training "
                     "(CPU s of training; the exact evaluator, whose time is not counted):\n\n"
                     + "\n".join(f"- {line}" for line in curves))
    if costs:
        ks = list(next(r for r in out.values() for r in r["runs"] if r.get("costs"))["costs"]["rk4"])
        parts.append("Flow matching, the trained flow's solver costs: forward NFE of sampling 10 000 points "
                     "(dopri5, rtol=atol=1e-5, no trace), of the exact-trace dopri5 1e-5 solve on 1024 held-out "
                     "points, and the held-out NLL by the exact evaluator (dopri5 1e-6) and by rk4 on a fixed "
                     "grid of 4, 8, 16 steps (exact trace; 4 NFE per step)\n\n"
                     + table(["dataset", "sampling NFE", "NLL solve NFE", "NLL dopri5 1e-6"]
                             + [f"NLL rk4 x{k} ({4 * int(k)} NFE)" for k in ks], costs))
    return "\n\n".join(parts)


def w2_tables(out: dict, budget: float) -> str:
    parts = []
    for name, res in out.items():
        rows = [[r["run"], r["steps"], r["cpu_s"], f"{r['nll']:.3f}", f"{r['nll'] - res['true_nll']:.3f}",
                 "-" if math.isnan(r.get("nll_own", math.nan)) else f"{r['nll_own']:.3f}", r["nfe_start"] or "-",
                 r["nfe_end"] or "-", r["train_nfe_start"] or "-", r["train_nfe_end"] or "-", r["failed"] or ""]
                for r in res["runs"]]
        parts.append(f"**{name}** (true NLL {res['true_nll']:.3f}; budget {budget:g} CPU s per run)\n\n" + table(
            ["run", "steps", "CPU s", "held-out NLL", "NLL - true", "NLL, own solver", "NFE start", "NFE end",
             "train NFE start", "train NFE end", "note"], rows))
    fm = fm_tables(out)
    if fm:
        parts.append(fm)
    parts.append("Runs: " + "; ".join(f"`{k}`: {RUNS[k]}" for k in DEFAULT_RUNS))
    parts.append("NLL, own solver: the held-out NLL by the run's own training solver (exact trace), e.g. its fixed "
                 "grid. NFE start/end: forward NFE of one dopri5 solve at rtol=atol=1e-5 with the exact trace on "
                 "1024 held-out points, the same measurement for every CNF; train NFE: the run's own "
                 "forward NFE per training step (pyro_cnf/torchdyn: forward solve; zuko: calls of its MLP "
                 "in the forward solve).")
    parts.append("\n".join(f"- {line}" for line in w2_verdicts(out)))
    fm = w2_fm_targets(out)
    if fm:
        parts.append("Flow matching targets:\n\n" + table(["target", "status", "measured"], fm))
    return "\n\n".join(parts)
