"""A CNF as the variational posterior of Pyro SVI, against AutoNormal and AutoIAFNormal.

The target is a normalised density known in closed form whose shape no Gaussian fits:
Neal's funnel (``z1 ~ N(0, 3)``, ``z2 | z1 ~ N(0, exp(z1 / 2))``) or a banana
(``z1 ~ N(0, 2)``, ``z2 | z1 ~ N(z1^2 / 4 - 1, 0.5)``). Written as a Pyro model with
nothing observed, its evidence is 1, so ``ELBO = -KL(q || p) <= 0`` and 0 is a perfect
guide. Each guide trains for the same number of SVI steps; the final ELBO is averaged over
many particles. The figure puts guide samples over the true density's contours.

    python examples/svi_guide.py [--target funnel|banana] [--steps 600] [--out out/svi_guide]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow  # noqa: E402

import pyro_cnf  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.training import progress_loop  # noqa: E402

# name: (the law of z1, the law of z2 given z1, plot limits (z1, z2))
TARGETS: dict[str, tuple[Callable, Callable, tuple]] = {
    "funnel": (
        lambda: dist.Normal(0.0, 3.0),
        lambda z1: dist.Normal(0.0, torch.exp(z1 / 2)),
        ((-9, 9), (-12, 12)),
    ),
    "banana": (
        lambda: dist.Normal(0.0, 2.0),
        lambda z1: dist.Normal(z1**2 / 4 - 1, 0.5),
        ((-7, 7), (-3, 10)),
    ),
}


def model(target: str) -> None:
    first, second, _ = TARGETS[target]
    z1 = pyro.sample("z1", first())
    pyro.sample("z2", second(z1))


def log_density(target: str, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The target's exact log-density (what the model's trace scores), shape of ``z1``."""
    first, second, _ = TARGETS[target]
    return first().log_prob(z1) + second(z1).log_prob(z2)


def make_guides(target_model: Callable, hidden: Sequence[int], tol: float) -> dict:
    return {
        "AutoNormal": AutoNormal(target_model),
        "AutoIAFNormal": AutoIAFNormal(target_model, hidden_dim=list(hidden), num_transforms=2),
        "CNF": AutoNormalizingFlow(target_model, partial(pyro_cnf.cnf, hidden_dims=list(hidden), rtol=tol, atol=tol)),
    }


def train(target_model: Callable, guide, steps: int, particles: int, lr: float, desc: str) -> float:
    """SVI with Adam; returns the training wall time in seconds."""
    svi = SVI(target_model, guide, pyro.optim.Adam({"lr": lr}),
              Trace_ELBO(num_particles=particles, vectorize_particles=True))
    start = time.perf_counter()
    progress_loop(lambda i: {"loss": svi.step()}, steps, desc=desc)
    return time.perf_counter() - start


@torch.no_grad()
def final_elbo(target_model: Callable, guide, particles: int, batches: int = 8) -> tuple[float, float]:
    """The ELBO averaged over ``batches x particles`` draws, and its standard error."""
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    estimates = torch.tensor([-elbo.loss(target_model, guide) for _ in range(batches)])
    return estimates.mean().item(), (estimates.std() / batches**0.5).item()


@torch.no_grad()
def guide_samples(guide, n: int) -> torch.Tensor:
    """``n`` draws of the guide in one vectorised call, shape ``(n, 2)``."""
    with pyro.plate("draws", n, dim=-1):
        draw = guide()
    return torch.stack([draw["z1"], draw["z2"]], -1)


def plot(target: str, samples: dict[str, torch.Tensor], elbos: dict[str, float], path: Path) -> None:
    (x0, x1), (y0, y1) = TARGETS[target][2]
    g1, g2 = torch.meshgrid(torch.linspace(x0, x1, 300), torch.linspace(y0, y1, 300), indexing="ij")
    logp = log_density(target, g1, g2)
    # contours at fixed log-density drops from the mode (the funnel's neck is unbounded)
    levels = (logp.max() - torch.tensor([12.0, 8.0, 5.0, 3.0, 1.5, 0.5])).tolist()
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4), sharex=True, sharey=True)
    for ax, (name, z) in zip(axes, samples.items()):
        ax.contour(g1, g2, logp, levels=levels, cmap="Greys", linewidths=0.8)
        ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.35, color="C3")
        ax.set(title=f"{name}: ELBO {elbos[name]:.3f}", xlim=(x0, x1), ylim=(y0, y1), xlabel="z1")
    axes[0].set_ylabel("z2")
    fig.suptitle(f"guide samples over the true {target} (ELBO <= 0, 0 is exact)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="funnel")
    parser.add_argument("--steps", type=int, default=600, help="SVI steps, the same for every guide")
    parser.add_argument("--particles", type=int, default=64, help="ELBO particles per training step")
    parser.add_argument("--eval-particles", type=int, default=2048, help="final ELBO: 8 batches of this many")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32],
                        help="hidden widths, the same for the IAF and the CNF")
    parser.add_argument("--lr", type=float, default=PRESETS["guide"].lr, help="Adam's rate (the guide preset's)")
    parser.add_argument("--tol", type=float, default=1e-3, help="CNF solver rtol = atol in training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/svi_guide"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    target_model = partial(model, args.target)
    pyro.clear_param_store()
    guides = make_guides(target_model, args.hidden, args.tol)
    metrics: dict = {"target": args.target, "steps": args.steps, "elbo": {}, "elbo_stderr": {}, "train_seconds": {}}
    samples = {}
    for name, guide in guides.items():
        pyro.set_rng_seed(args.seed)  # each guide's result independent of the others'
        metrics["train_seconds"][name] = train(target_model, guide, args.steps, args.particles, args.lr, name)
        if name == "CNF":  # noisy SVI gradients tolerate a loose solve; the reported ELBO does not
            guide.transform.flow.rtol = guide.transform.flow.atol = 1e-6
        metrics["elbo"][name], metrics["elbo_stderr"][name] = final_elbo(target_model, guide, args.eval_particles)
        samples[name] = guide_samples(guide, 2000)
        print(f"{name:>13}: ELBO {metrics['elbo'][name]:8.4f} +- {metrics['elbo_stderr'][name]:.4f}"
              f"  ({metrics['train_seconds'][name]:.1f} s)")

    plot(args.target, samples, metrics["elbo"], args.out / "samples.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
