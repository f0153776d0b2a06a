"""Where pyro_cnf's log_prob time goes (W1 setting): field+trace vs solver, and the
solver's hot spots from cProfile.

    python benchmarks/profile_w1.py --dims 2,64 --trace exact,hutchinson
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import perturbed_field  # noqa: E402
import pyro_cnf  # noqa: E402


class Timed(torch.nn.Module):
    """Accumulates the CPU time spent inside the field (and its divergence)."""

    def __init__(self, field, closed: bool) -> None:
        super().__init__()
        self.field, self.seconds = field, 0.0
        self.input_dim, self.context_dim = field.input_dim, 0
        if closed:
            self.divergence = self._divergence

    def forward(self, t, x):
        start = time.process_time()
        out = self.field(t, x)
        self.seconds += time.process_time() - start
        return out

    def _divergence(self, t, x):
        start = time.process_time()
        out = self.field.divergence(t, x)
        self.seconds += time.process_time() - start
        return out


def profile(d: int, trace: str, calls: int, batch: int = 1024, top: int = 12) -> str:
    torch.manual_seed(d)
    field = perturbed_field(d)
    x = torch.randn(batch, d)
    timed = Timed(field, closed=trace == "exact")
    flow = pyro_cnf.ContinuousFlow(timed, trace=trace, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        flow(x)
        timed.seconds = 0.0
        pr = cProfile.Profile(time.process_time)
        start = time.process_time()
        pr.enable()
        for _ in range(calls):
            z, ladj = flow(x)
        pr.disable()
        total = time.process_time() - start
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    field_share = timed.seconds / total
    # The autograd part of a Hutchinson NFE runs in the flow's _autograd, outside Timed.
    return (f"d={d} trace={trace}: {1e3 * total / calls:.1f} ms/call, NFE {flow.nfe}, "
            f"field(+closed div) {100 * field_share:.0f}% of the time, rest (solver, VJPs, glue) "
            f"{100 * (1 - field_share):.0f}%\n" + s.getvalue())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="2,64")
    p.add_argument("--trace", default="exact,hutchinson")
    p.add_argument("--calls", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(1)
    for d in map(int, a.dims.split(",")):
        for trace in a.trace.split(","):
            print(profile(d, trace, a.calls))


if __name__ == "__main__":
    main()
