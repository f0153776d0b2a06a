"""Bayesian logistic regression with a CNF posterior, checked against NUTS and AutoNormal.

Data: scikit-learn's breast_cancer (569 tumours, 30 features; by default the first 10, the
"mean" features, which are strongly collinear: radius, perimeter and area), standardised
on the training split, 25% held out. Model: ``w ~ N(0, I)``, ``b ~ N(0, 5^2)``,
``y ~ Bernoulli(sigmoid(x.w + b))``. The collinear features make the posterior correlated,
which a mean-field guide (AutoNormal) cannot represent: it under-estimates the posterior
standard deviations. A flow can represent it.

Reports the final ELBO of both guides, the posterior predictive accuracy and
log-likelihood on the held-out split for the CNF guide, AutoNormal and NUTS, and how far
each guide's posterior means and standard deviations are from NUTS's (in units of NUTS's
standard deviations).

    python examples/bayesian_regression.py [--steps 600] [--nuts-samples 200] [--out out/bayesian_regression]
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
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import pyro_cnf  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.training import progress_loop  # noqa: E402

GUIDE = PRESETS["guide"]


def load_data(features: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Train/test split of breast_cancer, standardised with the training statistics."""
    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X[:, :features], y, test_size=0.25, stratify=y, random_state=seed
    )
    X_train, X_test, y_train, y_test = (
        torch.as_tensor(a, dtype=torch.float32) for a in (X_train, X_test, y_train, y_test)
    )
    mean, std = X_train.mean(0), X_train.std(0)
    return (X_train - mean) / std, y_train, (X_test - mean) / std, y_test


def logits(X: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x.w + b`` for every row of ``X`` (N, d). Sample dims sit left of the data plate's
    dim -1, as Pyro lays them out: ``w`` (..., 1, d) and ``b`` (..., 1) give (..., N);
    unbatched, ``w`` (d,) and ``b`` () give (N,)."""
    return (w * X).sum(-1) + b


def model(X: torch.Tensor, y: torch.Tensor | None = None) -> None:
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(X.new_zeros(()), 5.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits(X, w, b)), obs=y)


def coefficients(draw: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(w, b)`` draws as one ``(S, d + 1)`` matrix (sample dims flattened)."""
    theta = torch.cat([draw["w"], draw["b"].unsqueeze(-1)], -1)
    return theta.reshape(-1, theta.shape[-1])


def fit_guide(
    guide, X: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, desc: str
) -> tuple[torch.Tensor, dict]:
    """SVI with Adam for ``args.steps`` steps; returns ``args.draws`` posterior draws of (w, b)
    and the final ELBO (1024 particles)."""
    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
              Trace_ELBO(num_particles=args.particles, vectorize_particles=True))
    progress_loop(lambda i: {"loss": svi.step(X, y)}, args.steps, desc=desc)
    with torch.no_grad():
        elbo = -Trace_ELBO(num_particles=1024, vectorize_particles=True).loss(model, guide, X, y)
        with pyro.plate("draws", args.draws, dim=-2):
            return coefficients(guide(X)), {"elbo": elbo}


def run_nuts(X: torch.Tensor, y: torch.Tensor, samples: int, warmup: int) -> tuple[torch.Tensor, dict]:
    mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=warmup)
    mcmc.run(X, y)
    return coefficients(mcmc.get_samples()), {}


def predictive(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy and mean log-likelihood of the posterior predictive
    ``p(y=1 | x) = E_theta[sigmoid(x.w + b)]``."""
    p = torch.sigmoid(logits(X, theta[:, None, :-1], theta[:, None, -1])).mean(0).clamp(1e-7, 1 - 1e-7)
    return {
        "accuracy": ((p > 0.5).float() == y).float().mean().item(),
        "log_lik": (y * p.log() + (1 - y) * (1 - p).log()).mean().item(),
    }


def versus_nuts(theta: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean errors in units of NUTS's posterior std, and std ratios, over the coefficients."""
    ref_std = reference.std(0)
    mean_err = (theta.mean(0) - reference.mean(0)).abs() / ref_std
    ratio = theta.std(0) / ref_std
    return {"mean_err_in_nuts_std": mean_err.mean().item(), "max_mean_err_in_nuts_std": mean_err.max().item(),
            "std_ratio_mean": ratio.mean().item(), "std_ratio_min": ratio.min().item()}


def plot(draws: dict[str, torch.Tensor], names: list[str], path: Path) -> None:
    """Per-coefficient mean +- std of each method, and the pair NUTS finds most correlated
    (NUTS drawn last, on top)."""
    reference = draws["NUTS"]
    corr = torch.corrcoef(reference.t()).fill_diagonal_(0)
    i, j = divmod(corr.abs().argmax().item(), corr.shape[0])  # the most correlated pair
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    positions = torch.arange(len(names), dtype=torch.float32)
    for k, (label, theta) in enumerate(draws.items()):
        left.errorbar(positions + 0.2 * (k - 1), theta.mean(0), theta.std(0), fmt="o", ms=3, capsize=2, label=label)
        right.scatter(theta[:, i], theta[:, j], s=3, alpha=0.3, label=label)
    left.set_xticks(positions, names, rotation=60, ha="right")
    left.set(title="posterior mean +- std per coefficient", ylabel="value")
    left.legend()
    right.set(title=f"most correlated pair under NUTS (r = {corr[i, j]:.2f})", xlabel=names[i], ylabel=names[j])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="SVI steps, the same for both guides")
    parser.add_argument("--features", type=int, default=10, help="use the first N of the 30 features")
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"CNF hidden widths (default: the guide preset's, {GUIDE.field['hidden_dims']})")
    parser.add_argument("--lr", type=float, default=GUIDE.lr_range[1],
                        help="Adam's rate (default: the top of the guide preset's lr_range)")
    parser.add_argument("--tol", type=float, default=1e-3, help="CNF solver rtol = atol")
    parser.add_argument("--draws", type=int, default=1000, help="posterior draws from each guide")
    parser.add_argument("--nuts-samples", type=int, default=200)
    parser.add_argument("--nuts-warmup", type=int, default=None, help="default: --nuts-samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bayesian_regression"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    X_train, y_train, X_test, y_test = load_data(args.features, args.seed)
    names = list(load_breast_cancer().feature_names[: args.features]) + ["bias"]
    pyro.clear_param_store()
    make_cnf = partial(pyro_cnf.cnf, hidden_dims=args.hidden, rtol=args.tol, atol=args.tol)
    methods: dict[str, Callable[[], tuple[torch.Tensor, dict]]] = {
        "AutoNormal": lambda: fit_guide(AutoNormal(model), X_train, y_train, args, "AutoNormal"),
        "CNF": lambda: fit_guide(AutoNormalizingFlow(model, make_cnf), X_train, y_train, args, "CNF"),
        "NUTS": lambda: run_nuts(X_train, y_train, args.nuts_samples, args.nuts_warmup or args.nuts_samples),
    }
    draws, metrics = {}, {"features": args.features, "steps": args.steps, "nuts_samples": args.nuts_samples}
    for name, fit in methods.items():
        pyro.set_rng_seed(args.seed)  # each method's result independent of the others'
        start = time.perf_counter()
        draws[name], extra = fit()
        metrics[name] = {"seconds": time.perf_counter() - start, **extra, **predictive(draws[name], X_test, y_test)}
    for name in ("AutoNormal", "CNF"):
        metrics[name].update(versus_nuts(draws[name], draws["NUTS"]))
    for name in methods:
        print(name, {k: round(v, 4) for k, v in metrics[name].items()})

    plot(draws, names, args.out / "posterior.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
