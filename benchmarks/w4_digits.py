"""W4: scikit-learn's 8x8 digits (d = 64), every run under the same CPU budget.

Data: ``load_digits`` pixels p in {0..16}, dequantised ``y = (p + u) / 17`` with
``u ~ U(0, 1)`` (fresh noise every training step, fixed noise for the test set), so ``y``
lies in (0, 1) with a proper density; then standardised with the training set's per-pixel
mean and standard deviation, ``z = (y - m) / s``. Models fit ``z``; NLLs are reported for
``y`` (nats per image, adding ``sum(log s)``), so that any model of the dequantised digits
could be compared. Split: 1437 training / 360 test images (``train_test_split``, seed 0).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from common import table
from trainers import BATCH, LR, RUNS, fm_recipe, recipe_text, train
from w2_toy import fm_targets

DEFAULT_RUNS = ("pyro_cnf_dopri5", "pyro_cnf_hutch", "pyro_cnf_fm", "zuko", "maf")
#: The flow-matching recipe at d = 64: the "flow_matching_wide" preset's.
FM_RECIPE_W4 = fm_recipe("flow_matching_wide")
#: Held-out NLL curve of the flow-matching run (fractions of the budget; whole test set,
#: exact evaluator, not counted in the budget).
CURVE_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75)


def digits(seed: int = 0):
    """``(train pixels (N, 64) float64, test y (M, 64), standardise, log|det| of it)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels = torch.as_tensor(load_digits().data, dtype=torch.float64)
    train_px, test_px = train_test_split(pixels, test_size=360, random_state=0)
    g = torch.Generator().manual_seed(seed + 1)
    train_y = (train_px + torch.rand(train_px.shape, generator=g, dtype=torch.float64)) / 17
    mean, std = train_y.mean(0), train_y.std(0)
    test_y = (test_px + torch.rand(test_px.shape, generator=g, dtype=torch.float64)) / 17
    return train_px, test_y, (lambda y: ((y - mean) / std).float()), -std.log().sum().item()


def run_w4(runs, budget: float, seed: int = 0, log=print) -> dict:
    train_px, test_y, standardise, log_det = digits(seed)
    test = standardise(test_y)
    n = train_px.shape[0]
    g = torch.Generator().manual_seed(seed + 2)

    def next_batch(step: int):
        rows = torch.randint(n, (BATCH,), generator=g)
        return standardise((train_px[rows] + torch.rand(BATCH, 64, generator=g, dtype=torch.float64)) / 17)

    results = []
    for run in runs:
        fm = run == "pyro_cnf_fm"
        r = asdict(train(run, 64, next_batch, budget, test, test, seed=seed, log=log, n_curve=len(test),
                         recipe=FM_RECIPE_W4 if fm else None,
                         curve_at=[f * budget for f in CURVE_FRACTIONS] if fm else ()))
        r["nll_y"] = r["nll"] - log_det  # NLL of y = NLL of z - log|dz/dy|
        log(f"  digits {run}: NLL {r['nll_y']:.1f} nats/image after {r['steps']} steps; NFE {r['nfe_start']} -> {r['nfe_end']}")
        results.append(r)
    return dict(runs=results, log_det=log_det)


def w4_tables(out: dict, budget: float) -> str:
    rows = [[r["run"], r["steps"], r["cpu_s"], r["nll_y"], r["nll_y"] / 64, r["nfe_start"] or "-",
             r["nfe_end"] or "-", r["train_nfe_end"] or "-", r["failed"]] for r in out["runs"]]
    by = {r["run"]: r for r in out["runs"]}
    lines = []
    if "pyro_cnf_dopri5" in by and "pyro_cnf_hutch" in by:
        a, b = by["pyro_cnf_dopri5"], by["pyro_cnf_hutch"]
        lines.append(f"exact vs Hutchinson trace: exact closed-form trace NLL {a['nll_y']:.1f} ({a['steps']} steps) vs Hutchinson "
                     f"{b['nll_y']:.1f} ({b['steps']} steps) in the same budget: "
                     f"{'exact better' if a['nll_y'] < b['nll_y'] else 'Hutchinson better'} by "
                     f"{abs(a['nll_y'] - b['nll_y']):.1f} nats")
    for peer in ("zuko", "maf"):
        if peer in by and "pyro_cnf_dopri5" in by:
            gap = by[peer]["nll_y"] - by["pyro_cnf_dopri5"]["nll_y"]
            lines.append(f"pyro_cnf (exact) vs {peer}: {'better' if gap > 0 else 'worse'} by {abs(gap):.1f} nats")
    if "pyro_cnf_fm" in by and "maf" in by:
        gap = by["maf"]["nll_y"] - by["pyro_cnf_fm"]["nll_y"]
        lines.append(f"flow matching vs maf: {by['pyro_cnf_fm']['nll_y']:.1f} vs {by['maf']['nll_y']:.1f} nats/image, "
                     f"{'better' if gap > 0 else 'worse'} by {abs(gap):.1f} nats")
    fm_rows = fm_targets("W4 digits", by, unit=" nats/image")
    fm = by.get("pyro_cnf_fm")
    curve = ""
    if fm and fm.get("nll_curve"):
        curve = ("\n\nFlow matching: held-out NLL (nats/image, all test images) during training, CPU s of "
                 "training (evaluation not counted): "
                 + ", ".join(f"{s:g} s {v - out['log_det']:.1f}" for s, _, v in fm["nll_curve"]))
    return (f"Budget {budget:g} CPU s per run, batch {BATCH}, Adam lr {LR:g} (flow matching: the "
            f"'flow_matching_wide' preset's recipe, {recipe_text(FM_RECIPE_W4)}); "
            "held-out NLL of the dequantised digits y in (0,1)^64 (nats per image and per dim; lower is better), "
            "exact evaluator.\n\n"
            + table(["run", "steps", "CPU s", "NLL (nats/image)", "nats/dim", "NFE start", "NFE end",
                     "train NFE end", "note"], rows)
            + "\n\nRuns: " + "; ".join(f"`{k}`: {RUNS[k]}" for k in DEFAULT_RUNS)
            + curve + "\n\n" + "\n".join(f"- {line}" for line in lines)
            + ("\n\nFlow matching targets:\n\n" + table(["target", "status", "measured"], fm_rows) if fm_rows else ""))
