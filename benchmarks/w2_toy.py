"""W2: 2-D toy densities, every run under the same CPU budget, one exact evaluator."""

from __future__ import annotations

import math
from dataclasses import asdict


from common import table
from trainers import RUNS, train

DEFAULT_RUNS = ("pyro_cnf_dopri5", "pyro_cnf_rk4", "pyro_cnf_rk4_rnode", "pyro_cnf_fm", "zuko", "torchdyn", "maf")
CNF_PEERS = ("zuko", "torchdyn")
BATCH = 256
TEST_SEED = 10**6


def toy_data():
    """``(sample(name, n, seed), true_log_prob(name, x) or None)``: pyro_cnf.datasets."""
    from pyro_cnf import datasets

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
            r = train(run, 2, lambda i, k=k: sample(name, BATCH, seed=seed + 7919 * (k + 1) + i), budget, test,
                      test[:1024], seed=seed, log=log)
            log(f"  {name} {run}: NLL {r.nll:.3f} after {r.steps} steps; NFE {r.nfe_start} -> {r.nfe_end}")
            results.append(asdict(r))
        out[name] = dict(true_nll=true_nll, runs=results)
    return out


def w2_verdicts(out: dict) -> list[str]:
    lines = []
    for name, res in out.items():
        by = {r["run"]: r for r in res["runs"]}
        mine = {k: v for k, v in by.items() if k.startswith("pyro_cnf") and not math.isnan(v["nll"])}
        peers = {k: v for k, v in by.items() if k in CNF_PEERS and not math.isnan(v["nll"])}
        if mine and peers:
            best = min(mine.values(), key=lambda r: r["nll"])
            worst_gap = min(p["nll"] - best["nll"] for p in peers.values())
            lines.append(f"{name}: best pyro_cnf run {best['run']} NLL {best['nll']:.3f} vs best CNF peer "
                         f"{min(peers.values(), key=lambda r: r['nll'])['run']} "
                         f"{min(p['nll'] for p in peers.values()):.3f}: "
                         f"{'MET' if worst_gap > 0 else 'NOT MET'} (margin {worst_gap:+.3f} nats)")
            dflt = by.get("pyro_cnf_dopri5")
            if dflt:
                gap = min(p["nll"] - dflt["nll"] for p in peers.values())
                lines.append(f"{name}: default pyro_cnf (dopri5 MLE) NLL {dflt['nll']:.3f}: "
                             f"{'beats' if gap > 0 else 'does NOT beat'} every CNF peer (margin {gap:+.3f})")
        reg, plain = by.get("pyro_cnf_rk4_rnode"), by.get("pyro_cnf_rk4")
        if reg and plain and plain["nfe_end"]:
            ratio = reg["nfe_end"] / plain["nfe_end"]
            dnll = reg["nll"] - plain["nll"]
            ok = ratio <= 0.5 and dnll <= 0.05
            lines.append(f"{name}: RNODE end NFE {reg['nfe_end']} vs unregularised rk4 {plain['nfe_end']} "
                         f"(ratio {ratio:.2f}, target <= 0.5), NLL {reg['nll']:.3f} vs {plain['nll']:.3f} "
                         f"(diff {dnll:+.3f}, target <= 0.05): {'MET' if ok else 'NOT MET'}")
            dop = by.get("pyro_cnf_dopri5")
            if dop and dop["nfe_end"]:
                lines.append(f"{name}: RNODE end NFE vs dopri5 MLE run {dop['nfe_end']}: ratio "
                             f"{reg['nfe_end'] / dop['nfe_end']:.2f}, NLL diff {reg['nll'] - dop['nll']:+.3f}")
    return lines


def w2_tables(out: dict, budget: float) -> str:
    parts = []
    for name, res in out.items():
        rows = [[r["run"], r["steps"], r["cpu_s"], r["nll"], r["nll"] - res["true_nll"], r["nfe_start"] or "-",
                 r["nfe_end"] or "-", r["train_nfe_start"] or "-", r["train_nfe_end"] or "-", r["failed"] or ""]
                for r in res["runs"]]
        parts.append(f"**{name}** (true NLL {res['true_nll']:.3f}; budget {budget:g} CPU s per run)\n\n" + table(
            ["run", "steps", "CPU s", "held-out NLL", "NLL - true", "NFE start", "NFE end", "train NFE start",
             "train NFE end", "note"], rows))
    parts.append("Runs: " + "; ".join(f"`{k}`: {RUNS[k]}" for k in DEFAULT_RUNS))
    parts.append("NFE start/end: forward NFE of one dopri5 solve at rtol=atol=1e-5 with the exact trace on "
                 "1024 held-out points, the same measurement for every CNF; train NFE: the run's own "
                 "forward NFE per training step (pyro_cnf/torchdyn: forward solve; zuko: calls of its MLP "
                 "in the forward solve).")
    parts.append("\n".join(f"- {line}" for line in w2_verdicts(out)))
    return "\n\n".join(parts)
