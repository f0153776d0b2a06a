"""The targets of the benchmark report, checked against a results dict of :mod:`run`."""

from __future__ import annotations

from common import table


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def w1_targets(w1: dict) -> list[list[str]]:
    rows, out = w1["rows"], []
    dims = sorted({r["d"] for r in rows if not r["impl"].startswith("pyro_cnf")})
    for d in dims:
        matched = [m for m in w1.get("matched", []) if m["d"] == d]
        if matched:
            unreached = [m["peer"] for m in matched if m["ratio"] != m["ratio"]]
            worst = max((m for m in matched if m["ratio"] == m["ratio"]), key=lambda m: m["ratio"], default=None)
            ok = not unreached and worst is not None and worst["ratio"] <= 0.8
            out.append([f"W1 d={d} exact: pyro_cnf ms/call <= 0.8x every peer's at <= its error", _met(ok),
                        ", ".join(f"{m['peer']} {m['ratio']:.2f}x" if m["ratio"] == m["ratio"] else
                                  f"{m['peer']}: no pyro_cnf tolerance reached its error {m['peer_err']:.1e}"
                                  for m in matched)])
        mine = [r for r in rows if r["d"] == d and r["impl"] == "pyro_cnf" and r["trace"] == "hutchinson"]
        peers = [r for r in rows if r["d"] == d and r["trace"] == "hutchinson" and not r["impl"].startswith("pyro_cnf")]
        if mine and peers:
            best = min(peers, key=lambda r: r["ms"])
            ratio = mine[0]["ms"] / best["ms"]
            out.append([f"W1 d={d} Hutchinson: pyro_cnf ms/call <= 0.8x the fastest peer's (same tol)",
                        _met(ratio <= 0.8), f"{ratio:.2f}x of {best['impl']} ({mine[0]['ms']:.0f} vs {best['ms']:.0f} ms; "
                        f"error {mine[0]['err']:.2f} vs {best['err']:.2f}, estimator noise)"])
    for r in rows:
        if r["impl"] == "pyro_cnf":
            ratio = r["over_floor"]
            out.append([f"W1 d={r['d']} {r['trace']}: ms/NFE <= 1.15x raw field+trace", _met(ratio <= 1.15),
                        f"{ratio:.2f}x (per-round ratio, median; floor {r['floor_ms']:.2f} ms)"])
    by = {(r["d"], r["impl"], r["trace"]): r for r in rows}
    for d in sorted({r["d"] for r in rows}):
        closed, hutch = by.get((d, "pyro_cnf", "exact")), by.get((d, "pyro_cnf", "hutchinson"))
        if closed and hutch and d <= 64:
            ratio = closed["ms_per_nfe"] / hutch["ms_per_nfe"]
            out.append([f"exact trace, d={d}: closed-form exact ms/NFE <= 1.5x pyro_cnf Hutchinson ms/NFE",
                        _met(ratio <= 1.5), f"{ratio:.2f}x"])
        peers = [r for r in rows if r["d"] == d and r["trace"] == "exact" and not r["impl"].startswith("pyro_cnf")]
        if closed and peers and d == 64:
            best = min(peers, key=lambda r: r["ms_per_nfe"])
            ratio = closed["ms_per_nfe"] / best["ms_per_nfe"]
            out.append([f"exact trace, d={d}: closed-form exact ms/NFE <= 0.1x the best peer's exact ms/NFE",
                        _met(ratio <= 0.1), f"{ratio:.3f}x of {best['impl']}"])
    return out


def w3_targets(w3: list[dict]) -> list[list[str]]:
    from w3_sampling import equal_error

    out = []
    for d in sorted({r["d"] for r in w3}):
        for key, what in (("err", "max"), ("err_mean", "mean")):
            zuko, mine = equal_error(w3, d, key)
            out.append([f"W3 d={d}: samples/s >= 2x zuko's at <= its {what} error",
                        _met(bool(mine) and mine["vs_zuko"] >= 2),
                        f"{mine['vs_zuko']:.2f}x with {mine['impl']} ({what} err {mine[key]:.1e} vs zuko {zuko[key]:.1e})"
                        if mine else f"no pyro_cnf setting reached zuko's {what} error {zuko[key]:.1e}"])
    return out


def all_targets(results: dict) -> str:
    rows = []
    if "W1" in results:
        rows += w1_targets(results["W1"])
    if "W3" in results:
        rows += w3_targets(results["W3"])
    if "W2" in results:
        from w2_toy import w2_fm_targets, w2_verdicts

        rows += w2_fm_targets(results["W2"])
        rows += [["W2 " + line.split(":")[0], "MET" if "MET" in line and "NOT MET" not in line else
                  ("NOT MET" if "NOT MET" in line else "-"), line.split(":", 1)[1].strip()]
                 for line in w2_verdicts(results["W2"])]
    if "W4" in results:
        by = {r["run"]: r for r in results["W4"]["runs"]}
        exact, hutch = by.get("pyro_cnf_dopri5"), by.get("pyro_cnf_hutch")
        if exact and hutch:
            rows.append(["W4: exact closed-form trace trains to a lower held-out NLL than Hutchinson",
                         _met(exact["nll_y"] < hutch["nll_y"]),
                         f"{exact['nll_y']:.1f} vs {hutch['nll_y']:.1f} nats/image ({exact['steps']} vs {hutch['steps']} steps)"])
        for peer in ("zuko", "maf"):
            if exact and peer in by:
                rows.append([f"W4: pyro_cnf (exact) NLL below {peer}'s", _met(exact["nll_y"] < by[peer]["nll_y"]),
                             f"{exact['nll_y']:.1f} vs {by[peer]['nll_y']:.1f} nats/image"])
        from w2_toy import fm_targets

        rows += fm_targets("W4 digits", by, unit=" nats/image")
    if "MEM" in results:
        from memory import memory_verdict

        rows += [["MEM " + line.split(":")[0], "MET" if "MET" in line and "NOT MET" not in line else
                  ("NOT MET" if "NOT MET" in line else "-"), line.split(":", 1)[1].strip()]
                 for line in memory_verdict(results["MEM"])]
    return table(["target", "status", "measured"], rows)
