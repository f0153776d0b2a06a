"""Conditional density estimation p(y | x) with both adapters of a conditional CNF.

The data changes shape with the context: ``y = r(x) (cos a, sin a) + s e`` with
``x ~ U(-2, 2)``, ``a ~ U(0, 2 pi)``, ``e ~ N(0, I_2)``, ``s = 0.3`` and ``r(x) = 1.5 max(x, 0)``:
a Gaussian blob for ``x <= 0`` that opens into a ring for ``x > 0``. The true conditional
density is known in closed form (a Gaussian averaged around a circle):

    p(y | x) = exp(-(|y|^2 + r^2) / (2 s^2)) I0(|y| r / s^2) / (2 pi s^2)

so the held-out NLL has a floor, the true conditional entropy. The same conditional CNF
(same seed, so the same initial field and minibatches) is trained through each adapter for
the same number of steps; the two should agree up to floating-point round-off:

* Pyro: ``pyro_cnf.ConditionalCNF`` in a ``ConditionalTransformedDistribution``;
* nflows: ``pyro_cnf.CNFTransform(context_dim=1)`` in a ``Flow``.

    python examples/conditional_density.py [--steps 400] [--out out/conditional_density]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from nflows.distributions import StandardNormal  # noqa: E402
from nflows.flows import Flow  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import pyro_cnf  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.training import Trainer, nll  # noqa: E402

DENSITY = PRESETS["density"]  # where both adapters start

NOISE = 0.3
PLOT_CONTEXTS = (-1.0, 0.5, 1.0, 2.0)
LIMIT = 4.0  # plots show y in [-LIMIT, LIMIT]^2

LogProb = Callable[[Tensor, Tensor], Tensor]


def tolerances(tol: float | None) -> dict:
    """``rtol = atol = tol`` for every solve, or nothing: the library's defaults."""
    return {} if tol is None else {"rtol": tol, "atol": tol}


def radius(x: Tensor) -> Tensor:
    return 1.5 * x.clamp(min=0)


def sample(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` pairs: ``y`` of shape ``(n, 2)`` and the context ``x`` of shape ``(n, 1)``."""
    x = 4 * torch.rand(n, 1, generator=generator) - 2
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    circle = torch.stack([angle.cos(), angle.sin()], -1)
    return radius(x) * circle + NOISE * torch.randn(n, 2, generator=generator), x


def true_log_prob(y: Tensor, x: Tensor) -> Tensor:
    """``log p(y | x)`` in closed form, shape ``(n,)``; ``i0e(z) = exp(-z) I0(z)`` keeps it finite."""
    r, norm = radius(x).squeeze(-1), y.norm(dim=-1)
    z = norm * r / NOISE**2
    return torch.special.i0e(z).log() + z - (norm**2 + r**2) / (2 * NOISE**2) - math.log(2 * math.pi * NOISE**2)


class PyroConditional(nn.Module):
    """A Pyro ``ConditionalTransformedDistribution`` with a ``ConditionalCNF`` as a module
    with ``log_prob(y, x)``, which is what the trainer needs."""

    def __init__(self, hidden: Sequence[int] | None, tol: float | None) -> None:
        super().__init__()
        self.transform = pyro_cnf.ConditionalCNF(2, 1, hidden_dims=hidden, **tolerances(tol))
        base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        self.density = dist.ConditionalTransformedDistribution(base, [self.transform])

    def log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        return self.density.condition(x).log_prob(y)


def pyro_model(hidden: Sequence[int] | None, tol: float | None) -> nn.Module:
    return PyroConditional(hidden, tol)


def nflows_model(hidden: Sequence[int] | None, tol: float | None) -> nn.Module:
    # an nflows Flow already has log_prob(inputs, context)
    return Flow(pyro_cnf.CNFTransform(2, hidden_dims=hidden, context_dim=1, **tolerances(tol)), StandardNormal([2]))


def minibatches(y: Tensor, x: Tensor, batch_size: int, seed: int):
    """``step -> (y, x)``: ``batch_size`` rows drawn without replacement every step."""
    generator = torch.Generator().manual_seed(seed)

    def batch(step: int) -> tuple[Tensor, Tensor]:
        rows = torch.randperm(len(y), generator=generator)[:batch_size]
        return y[rows], x[rows]

    return batch


@torch.no_grad()
def density_grid(log_prob: LogProb, context: float, size: int = 120) -> Tensor:
    """``p(y | x = context)`` on a ``size x size`` grid over ``[-LIMIT, LIMIT]^2`` (rows: y2)."""
    axis = torch.linspace(-LIMIT, LIMIT, size)
    y2, y1 = torch.meshgrid(axis, axis, indexing="ij")
    y = torch.stack([y1, y2], -1).reshape(-1, 2)
    return log_prob(y, torch.full((len(y), 1), context)).exp().reshape(size, size)


def plot(log_probs: dict[str, LogProb], path: Path) -> None:
    fig, axes = plt.subplots(len(log_probs), len(PLOT_CONTEXTS), figsize=(3 * len(PLOT_CONTEXTS), 3 * len(log_probs)))
    for row, (name, log_prob) in zip(axes, log_probs.items()):
        for ax, context in zip(row, PLOT_CONTEXTS):
            ax.imshow(density_grid(log_prob, context), origin="lower", extent=(-LIMIT, LIMIT, -LIMIT, LIMIT))
            ax.set(title=f"{name}, x = {context}", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="Adam steps, the same for both adapters")
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-test", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=DENSITY.lr, help="Adam's rate (the density preset's)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"the field's widths (default: the density preset's, {DENSITY.field['hidden_dims']})")
    parser.add_argument("--tol", type=float, default=None,
                        help="solver rtol = atol of every solve, training included "
                        "(default: the library's, 1e-5, and 1e-3 for a training solve)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/conditional_density"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(args.seed)
    y_train, x_train = sample(args.n_train, generator)
    y_test, x_test = sample(args.n_test, generator)
    metrics: dict = {"steps": args.steps, "true_nll": nll(true_log_prob, y_test, x_test)}
    log_probs: dict[str, LogProb] = {"true": true_log_prob}
    for name, build in (("Pyro ConditionalCNF", pyro_model), ("nflows CNFTransform", nflows_model)):
        torch.manual_seed(args.seed)  # the same initial field for both adapters
        model = build(args.hidden, args.tol)
        start = time.perf_counter()
        batches = minibatches(y_train, x_train, args.batch_size, args.seed)
        Trainer(model, batches, lr=args.lr, desc=name).fit(args.steps)
        model.eval()
        metrics[name] = {"test_nll": nll(model, y_test, x_test), "train_seconds": time.perf_counter() - start}
        log_probs[name] = model.log_prob
        print(f"{name}: held-out NLL {metrics[name]['test_nll']:.4f} (true density: {metrics['true_nll']:.4f}),"
              f" {metrics[name]['train_seconds']:.0f} s")

    plot(log_probs, args.out / "conditionals.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
