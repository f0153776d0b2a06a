"""Cost of the exact trace of an ``ODENet`` field, every method, and what ``trace="auto"`` picks.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/trace_cost.py            # the target grid
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/trace_cost.py --depths 3 --dims 8 --repeats 5

One evaluation of ``(f, tr df/dx)`` at batch 2000, one torch thread, float32, hidden width
``--hidden`` (the default field's), for every (depth, d); ``eval`` runs under ``no_grad`` (sampling, evaluation), ``train``
differentiates ``f.sum() + div.sum()`` w.r.t. the parameters and ``x`` (training by direct
backpropagation; the forward column is then the field's forward + backward). Methods:

* ``forward``: the field alone, the unit of every ratio;
* ``closed``: ``ODENet.divergence`` as shipped (its own choice of contraction);
* ``tangents`` / ``cyclic``: the two deep contractions forced (3+ hidden layers);
* ``vjp``: ``d`` VJPs in one batched autograd call (:func:`pyro_cnf.trace.exact_divergence`);
* ``vjp_loop``: a Python loop of ``d`` VJPs;
* ``old``: the per-sample Jacobian carry this branch replaces (a private copy below).

Times are process CPU ms, medians of interleaved rounds (every method in turn, ``--repeats``
rounds, the order rotated each round), so that drifts of a shared machine spread over all
methods alike; each timed evaluation follows an untimed one of the same method, as in a solve. ``model`` is
:meth:`ODENet.trace_costs` (forward passes) for ``closed`` and ``vjp``. ``auto runs`` is what
``trace="auto"`` executes: :meth:`ContinuousFlow.trace_mode` picks ``closed`` or batched VJPs
(:func:`pyro_cnf.trace.cheapest_exact`), and ``closed`` then picks its contraction; its time is
that method's column (the same code as ``closed``, timed separately: the two differ by the
noise), divided by the cheapest measured method of the row, any of them. The targets are the
issue's: ``closed`` at most 3x the forward pass for 3-4 hidden layers at d <= 8, and never
slower than the better of batched VJPs and the old carry.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, table  # noqa: E402

from pyro_cnf import ODENet  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.trace import cheapest_exact, exact_divergence, identity_basis  # noqa: E402

METHODS = ("forward", "closed", "tangents", "cyclic", "vjp", "vjp_loop", "old")


def old_carry(net: ODENet, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor]) -> Tensor:
    """The carry of 3+ hidden layers before this branch: the per-sample ``(N, h, d)``
    Jacobian pushed through ``w @ jac``, a broadcast batched matmul of N tiny matrices."""
    w_in, w_out = layers[0][0][:, : net.input_dim], layers[-1][0]
    jac = slopes[0].unsqueeze(-1) * w_in
    for (w, _), s in zip(layers[1:-2], slopes[1:-1]):
        jac = s.unsqueeze(-1) * (w @ jac)
    wj = layers[-2][0] @ jac
    return (slopes[-1] * (wj * w_out.t()).sum(-1)).sum(-1)


def cases(net: ODENet, x: Tensor, train: bool) -> dict[str, Callable[[], object]]:
    """One callable per method: an evaluation of ``(f, div)``, plus its backward in training."""
    t = torch.tensor(0.5)
    d = x.shape[1]
    basis = identity_basis(x)

    def pass_(xx: Tensor):
        f, layers, slopes = net._pass(t, xx, None, "benchmark")
        return f, layers, slopes

    def deep(kind: str):
        def fn(xx: Tensor):
            f, layers, slopes = pass_(xx)
            w_in, w_out = layers[0][0][:, :d], layers[-1][0]
            if kind == "tangents":
                return f, net._trace_tangents(w_in, w_out, layers, slopes, inplace=not train)
            if kind == "cyclic":
                return f, net._trace_cyclic(w_in @ w_out, layers, slopes, inplace=not train)
            return f, old_carry(net, layers, slopes)

        return fn

    def vjp(xx: Tensor):
        with torch.enable_grad():
            xx = xx if xx.requires_grad else xx.detach().requires_grad_()
            f = net(t, xx)
            return f, exact_divergence(f, xx, basis, create_graph=train)

    def vjp_loop(xx: Tensor):
        with torch.enable_grad():
            xx = xx if xx.requires_grad else xx.detach().requires_grad_()
            f = net(t, xx)
            div = 0
            for i in range(d):
                (row,) = torch.autograd.grad(f[:, i].sum(), xx, create_graph=train, retain_graph=True)
                div = div + row[:, i]
            return f, div

    fns: dict[str, Callable[[Tensor], object]] = {
        "forward": lambda xx: (net(t, xx), None),
        "closed": lambda xx: net.divergence(t, xx),
        "vjp": vjp,
        "vjp_loop": vjp_loop,
    }
    if len(net.hidden_dims) >= 3:
        fns.update(tangents=deep("tangents"), cyclic=deep("cyclic"), old=deep("old"))

    def run(fn: Callable[[Tensor], object]) -> Callable[[], object]:
        def go() -> object:
            if not train:
                with torch.no_grad():
                    return fn(x)
            xx = x.detach().requires_grad_()
            f, div = fn(xx)
            loss = f.sum() if div is None else f.sum() + div.sum()
            loss.backward()
            return None

        return go

    return {name: run(fns[name]) for name in METHODS if name in fns}


def measure(depth: int, d: int, train: bool, *, hidden: int, batch: int = 2000, repeats: int = 7,
            seed: int = 0, methods: tuple[str, ...] = METHODS) -> dict[str, float]:
    """Median CPU ms of every method for one configuration (interleaved rounds)."""
    torch.manual_seed(seed)
    net = ODENet(d, (hidden,) * depth, zero_init=False)
    net.requires_grad_(train)
    x = torch.randn(batch, d)
    fns = {k: v for k, v in cases(net, x, train).items() if k in methods}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated every round
            # An untimed call first: a solve evaluates the same method hundreds of times in a
            # row, reusing the memory the last call freed; right after another method, large
            # buffers are page-faulted anew, which would charge one method for its neighbour.
            fns[name]()
            start = time.process_time()
            fns[name]()
            times[name].append(1e3 * (time.process_time() - start))
    return {name: statistics.median(v) for name, v in times.items()}


def auto_choice(depth: int, d: int, train: bool, hidden: int) -> tuple[str, dict[str, float]]:
    """What ``trace="auto"`` runs (the column of this table that times it) and the modelled
    costs, in forward passes, of :meth:`ODENet.trace_costs`."""
    net = ODENet(d, (hidden,) * depth, zero_init=False)
    net.requires_grad_(train)
    with torch.set_grad_enabled(train):
        flow_mode = cheapest_exact(net)  # what ContinuousFlow.trace_mode returns for this field
    costs = net.trace_costs(train)
    if flow_mode == "exact":
        return "vjp", costs
    return (net._deep_method(train) if depth >= 3 else "closed"), costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64])
    parser.add_argument("--hidden", type=int, default=PRESETS["density"].field["hidden_dims"][0],
                        help="every hidden layer's width (default: the density preset's first, %(default)s)")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    headers = ["depth", "d", "mode", "forward ms", *(f"{m} ms (x fwd)" for m in METHODS[1:]),
               "model: closed, vjp (x fwd)", "auto runs", "auto / cheapest",
               "closed <= 3x fwd", "closed <= min(vjp, old)"]
    rows = []
    for mode in args.modes:
        train = mode == "train"
        for depth in args.depths:
            for d in args.dims:
                ms = measure(depth, d, train, hidden=args.hidden, batch=args.batch, repeats=args.repeats)
                fwd = ms["forward"]
                pick, costs = auto_choice(depth, d, train, args.hidden)
                # ``closed`` and the forced contraction it picks time the same code: the
                # cheapest is taken over distinct methods, auto's time is its own column
                distinct = [k for k in ms if k != "forward" and (depth < 3 or k != "closed")]
                cheapest = min(ms[k] for k in distinct)
                rivals = [ms[k] for k in ("vjp", "old") if k in ms]
                target3 = "-" if depth < 3 or d > 8 else ("met" if ms["closed"] <= 3 * fwd else "NOT met")
                cells = [f"{ms[m]:.3g} ({ms[m] / fwd:.2g}x)" if m in ms else "-" for m in METHODS[1:]]
                rows.append([depth, d, mode, fwd, *cells, f"{costs['closed']:.2g}, {costs['exact']:.2g}",
                             pick, ms[pick] / cheapest, target3,
                             "met" if ms["closed"] <= min(rivals) else "NOT met"])
                print(f"depth {depth} d {d} {mode}: " + ", ".join(f"{k} {v:.3g}" for k, v in ms.items()),
                      file=sys.stderr, flush=True)
    print(f"Exact trace of ODENet, hidden width {args.hidden}, batch {args.batch}, float32; "
          f"CPU ms per evaluation, medians of {args.repeats} interleaved rounds; "
          f"train = forward + backward of f.sum() + div.sum(). {machine()}\n")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
