"""Benchmarks of pyro_cnf against its peers, all in one run.

    python benchmarks/run.py                      # everything (~20 min on one core)
    python benchmarks/run.py --quick              # a few minutes, smaller everything
    python benchmarks/run.py --workloads W1 --dims 2,64 --impls pyro_cnf,zuko

Workloads: W1 log_prob throughput on one shared field; W2 training on 2-D toy densities
under an equal CPU budget; W3 sampling; W4 digits (64-d) under an equal budget; MEM peak
memory of adjoint vs direct backpropagation. Every timing is process CPU time with one
torch thread; W1/W3 report medians of interleaved repeats. Results are printed as Markdown
tables and saved under ``--out`` (default ``out/bench``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine  # noqa: E402

WORKLOADS = ("W1", "W2", "W3", "W4", "MEM")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--quick", action="store_true", help="small dims, one repeat, short budgets")
    p.add_argument("--dims", default=None, help="W1 dimensions (default 2,8,32,64)")
    p.add_argument("--big-dims", default=None, help="W1 pyro_cnf-only dimensions (default 128,256)")
    p.add_argument("--impls", default=None, help="W1/W3 implementations (default all): pyro_cnf,pyro_cnf_vjp,pyro_cnf_tdq,zuko,torchdyn,ffjord_ref")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats (default 3; quick 1)")
    p.add_argument("--batch", type=int, default=1024, help="W1 batch size")
    p.add_argument("--budget", type=float, default=None, help="W2 CPU seconds per training run (default 40)")
    p.add_argument("--w4-budget", type=float, default=None, help="W4 CPU seconds per training run (default 45)")
    p.add_argument("--datasets", default="checkerboard,8gaussians", help="W2 datasets")
    p.add_argument("--w2-impls", default=None, help="W2 runs (default all, see w2_toy.RUNS)")
    p.add_argument("--w4-impls", default=None, help="W4 runs (default all, see w4_digits.RUNS)")
    p.add_argument("--samples", type=int, default=10_000, help="W3 samples per call")
    p.add_argument("--n-test", type=int, default=20_000, help="W2 held-out points")
    p.add_argument("--mem-steps", type=int, default=8, help="MEM: rk4 steps N (and 4N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench", help="where results.json and report.md go")
    args = p.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    bad = set(args.workloads) - set(WORKLOADS)
    if bad:
        p.error(f"unknown workloads {sorted(bad)}; expected some of {WORKLOADS}")
    q = args.quick
    args.dims = [int(v) for v in (args.dims or ("2,8" if q else "2,8,32,64")).split(",") if v]
    args.big_dims = [int(v) for v in (args.big_dims or ("" if q else "128,256")).split(",") if v]
    args.repeats = args.repeats or (1 if q else 3)
    args.budget = args.budget or (8.0 if q else 40.0)
    args.w4_budget = args.w4_budget or (8.0 if q else 45.0)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Your vector field callable")  # torchdyn's wrapping notice
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# pyro_cnf benchmarks\n\nDate: {datetime.datetime.now().isoformat(timespec='minutes')}  \n"
              f"Command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`  \nMachine: {machine()}\n")
    sections, results = [header], {"args": vars(args)}

    def log(msg: str) -> None:
        print(msg, flush=True)

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "report.md").write_text("\n\n".join(sections) + "\n")

    if "W1" in args.workloads:
        from peers import IMPLS
        from w1_logprob import run_w1, w1_tables

        impls = args.impls.split(",") if args.impls else list(IMPLS)
        log(f"== W1: log_prob, batch {args.batch}, dopri5 rtol=atol=1e-5, dims {args.dims} + {args.big_dims}")
        r = run_w1(args.dims, impls, args.repeats, batch=args.batch, big_dims=args.big_dims, log=log)
        results["W1"] = r
        sections.append("## W1: log_prob throughput\n\n" + w1_tables(r))
        log(sections[-1])
        save()
    if "W3" in args.workloads:
        from w3_sampling import run_w3, w3_table

        dims = [d for d in args.dims if d in (2, 64)] or args.dims[:1]
        log(f"== W3: sampling {args.samples} points, dims {dims}")
        results["W3"] = run_w3(dims, args.samples, args.repeats, log=log)
        sections.append("## W3: sampling\n\n" + w3_table(results["W3"], args.samples))
        log(sections[-1])
        save()
    if "W2" in args.workloads:
        from w2_toy import DEFAULT_RUNS, run_w2, w2_tables

        runs = args.w2_impls.split(",") if args.w2_impls else list(DEFAULT_RUNS)
        log(f"== W2: toy densities {args.datasets}, {args.budget:g} CPU s per run, runs {runs}")
        results["W2"] = run_w2(args.datasets.split(","), runs, args.budget, n_test=args.n_test, seed=args.seed, log=log)
        sections.append("## W2: training on 2-D toy densities, equal CPU budget\n\n" + w2_tables(results["W2"], args.budget))
        log(sections[-1])
        save()
    if "W4" in args.workloads:
        from w4_digits import DEFAULT_RUNS as W4_RUNS, run_w4, w4_tables

        runs = args.w4_impls.split(",") if args.w4_impls else list(W4_RUNS)
        log(f"== W4: digits (d=64), {args.w4_budget:g} CPU s per run, runs {runs}")
        results["W4"] = run_w4(runs, args.w4_budget, seed=args.seed, log=log)
        sections.append("## W4: digits (64-d), equal CPU budget\n\n" + w4_tables(results["W4"], args.w4_budget))
        log(sections[-1])
        save()
    if "MEM" in args.workloads:
        from memory import memory_table, run_memory

        log("== MEM: peak memory, adjoint vs direct")
        results["MEM"] = run_memory(steps=args.mem_steps, log=log)
        sections.append("## Memory: adjoint vs direct backpropagation\n\n" + memory_table(results["MEM"]))
        log(sections[-1])
        save()
    from targets import all_targets

    sections.append("## Targets\n\n" + all_targets(results))
    log(sections[-1])
    save()


if __name__ == "__main__":
    main()
