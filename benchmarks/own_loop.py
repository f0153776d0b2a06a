"""A user's own training loop, not the Trainer: a preset's field under Pyro's ClippedAdam or
torch's Adam at a given rate, 300 steps of batch 512 on the checkerboard, then the held-out NLL
by dopri5 at 1e-6 with the exact trace.

    OMP_NUM_THREADS=1 python benchmarks/own_loop.py density clipped 1e-2
    OMP_NUM_THREADS=1 python benchmarks/own_loop.py density_high_lr adam 1e-2
"""

from __future__ import annotations

import argparse
import time

import torch
from pyro.optim.clipped_adam import ClippedAdam

from pyro_cnf import ContinuousFlow, default_flow
from pyro_cnf.presets import PRESETS
from pyro_cnf.toy import datasets

STEPS, BATCH, N_TEST = 300, 512, 5000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("optimizer", choices=("clipped", "adam"))
    parser.add_argument("lr", type=float)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    flow = default_flow(2, preset=args.preset)
    optimizer = (ClippedAdam if args.optimizer == "clipped" else torch.optim.Adam)(flow.parameters(), lr=args.lr)
    start = time.process_time()
    for step in range(STEPS):
        loss = -flow.log_prob(datasets.sample("checkerboard", BATCH, seed=step).float()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cpu = time.process_time() - start
    evaluator = ContinuousFlow(flow.vector_field, trace="exact", rtol=1e-6, atol=1e-6).eval()
    with torch.no_grad():
        nll = -evaluator.log_prob(datasets.sample("checkerboard", N_TEST, seed=-1).float()).mean().item()
    print(f"{args.preset} {args.optimizer} lr={args.lr:g}: NLL {nll:.3f} after {STEPS} steps, {cpu:.0f} CPU s")


if __name__ == "__main__":
    main()
