"""Simulation-based inference with sbi as the client: a pyro_cnf posterior against sbi's own.

The task is sbibm's two moons: ``theta ~ U(-1, 1)^2``, ``a ~ U(-pi/2, pi/2)``,
``r ~ N(0.1, 0.01^2)``, ``p = (r cos a + 0.25, r sin a)`` and

    x = p + (-|theta1 + theta2| / sqrt(2), (theta2 - theta1) / sqrt(2)),

whose posterior is two thin crescents. It is known exactly: for a fixed ``x``, each draw
of ``p`` and of the sign of ``theta1 + theta2`` solves for one ``theta`` (the map has
unit Jacobian on either side of ``theta1 + theta2 = 0``), and keeping the ``theta`` inside
the prior's box gives exact posterior draws (:func:`reference_samples`); the density is
the likelihood in closed form over the evidence, ``acceptance / 2``
(:func:`reference_log_prob`).

Every estimator gets the same simulations and the same training budget in process CPU
seconds (``--budget``), then sbi's posterior samples and scores it:

* ``NSF (sbi)``: ``NPE(prior, density_estimator="nsf")``, sbi's defaults;
* ``FMPE (sbi)``: sbi's flow-matching posterior estimation, its defaults;
* ``CNF by NPE (sbi)``: route (a), ``NPE(prior, density_estimator=build_cnf_estimator)``:
  sbi's own maximum-likelihood training of a pyro_cnf estimator built like sbi's
  (z-scored theta and x), with the library's default field and solver;
* ``CNF by flow matching``: route (b), ``flow_matching_estimator``: the conditional field
  and recipe of the ``"flow_matching"`` preset, trained without a solve, then handed to
  sbi's ``DirectPosterior`` for sampling and ``log_prob``.

sbi's trainers count epochs, not seconds: a probe run prices an epoch, and the real run
gets ``max_num_epochs = budget / price`` (early stopping stays on, so a run may stop
sooner; a CNF trained by maximum likelihood gets costlier per epoch as it learns, so it
may run over). Reported per estimator and averaged over ``--observations`` observations:
C2ST against exact posterior draws (an MLP classifier, 5-fold, as sbibm; 0.5 is perfect),
the negative log posterior density of the true parameters (NLPD; the exact posterior's is
given for reference) and the CPU time of drawing the samples through sbi.

    python examples/sbi_posterior.py [--budget 60] [--simulations 10000] [--out out/sbi_posterior]

Needs sbi: ``pip install -e ".[sbi]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.sbi import build_cnf_estimator, flow_matching_estimator  # noqa: E402

R_MEAN, R_STD, SHIFT = 0.1, 0.01, 0.25
NPE, FM = PRESETS["sbi"], PRESETS["flow_matching"]  # where the two CNF routes start
METHODS = ("NSF (sbi)", "FMPE (sbi)", "CNF by NPE (sbi)", "CNF by flow matching")


def prior():
    from sbi.utils import BoxUniform

    return BoxUniform(-torch.ones(2), torch.ones(2))


def _moon(n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of ``p = (r cos a + 0.25, r sin a)``."""
    a = math.pi * (torch.rand(n, generator=generator) - 0.5)
    r = R_MEAN + R_STD * torch.randn(n, generator=generator)
    return torch.stack([r * a.cos() + SHIFT, r * a.sin()], -1)


def _shift(theta: Tensor) -> Tensor:
    s, t = theta[..., 0] + theta[..., 1], theta[..., 1] - theta[..., 0]
    return torch.stack([-s.abs(), t], -1) / math.sqrt(2)


def simulate(theta: Tensor, generator: torch.Generator) -> Tensor:
    return _moon(len(theta), generator) + _shift(theta)


def _solve(x_o: Tensor, p: Tensor, sign: Tensor) -> Tensor:
    """The ``theta`` with ``x_o = p + shift(theta)`` and ``sign(theta1 + theta2) = sign``;
    NaN where there is none (``x_o[0] > p[0]``)."""
    u = x_o - p
    s = torch.where(u[:, 0] <= 0, -math.sqrt(2) * u[:, 0], torch.nan) * sign
    t = math.sqrt(2) * u[:, 1]
    return torch.stack([(s - t) / 2, (s + t) / 2], -1)


def _inside(theta: Tensor) -> Tensor:
    return (theta.abs() <= 1).all(-1)


def reference_samples(x_o: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` exact draws from ``p(theta | x_o)``."""
    out, total = [], 0
    while total < n:
        m = 4 * n
        sign = torch.randint(0, 2, (m,), generator=generator) * 2.0 - 1
        theta = _solve(x_o, _moon(m, generator), sign)
        theta = theta[_inside(theta)]
        out.append(theta)
        total += len(theta)
    return torch.cat(out)[:n]


def acceptance(x_o: Tensor, generator: torch.Generator, n: int = 2_000_000) -> float:
    """P(theta solved from a fresh p and sign lies in the box): the evidence is half of it."""
    sign = torch.randint(0, 2, (n,), generator=generator) * 2.0 - 1
    return _inside(_solve(x_o, _moon(n, generator), sign)).double().mean().item()


def reference_log_prob(theta: Tensor, x_o: Tensor, accept: float) -> Tensor:
    """``log p(theta | x_o)``: prior 1/4 on the box, the likelihood in closed form (the
    density of ``q = p - (0.25, 0)``: ``N(|q|; 0.1, 0.01^2) / (pi |q|)`` for ``q1 > 0``),
    over the evidence ``accept / 2``."""
    q = x_o - _shift(theta) - torch.tensor([SHIFT, 0.0], dtype=theta.dtype)
    rho = q.norm(dim=-1)
    log_lik = (-0.5 * ((rho - R_MEAN) / R_STD) ** 2 - math.log(R_STD * math.sqrt(2 * math.pi))
               - math.log(math.pi) - rho.log())
    log_lik = torch.where(q[..., 0] > 0, log_lik, -torch.inf)
    log_prior = torch.where(_inside(theta), -math.log(4.0), -torch.inf)
    return log_prior + log_lik - math.log(accept / 2)


def c2st(reference: Tensor, samples: Tensor, seed: int = 0, folds: int = 5) -> float:
    """Classifier two-sample test accuracy as sbibm computes it: z-score both sets by the
    reference's moments, an MLP (two hidden layers of 10 d ReLUs, Adam), ``folds``-fold
    cross-validated accuracy. 0.5: indistinguishable; 1: fully separable."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    x, y = reference.double().numpy(), samples.double().numpy()
    mean, std = x.mean(0), x.std(0)
    data = (np.concatenate([x, y]) - mean) / std
    labels = np.concatenate([np.zeros(len(x)), np.ones(len(y))])
    d = data.shape[1]
    clf = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * d, 10 * d), max_iter=1000, solver="adam",
                        random_state=seed)
    split = KFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of tiny smoke runs
        return float(np.mean(cross_val_score(clf, data, labels, cv=split, scoring="accuracy")))


class NoTracker:
    """sbi's tracker protocol, recording nothing (its default writes TensorBoard logs to
    ``./sbi-logs``)."""

    log_dir = None

    def log_metric(self, name, value, step=None) -> None: ...

    def log_metrics(self, metrics, step=None) -> None: ...

    def log_params(self, params) -> None: ...

    def add_figure(self, name, figure, step=None) -> None: ...

    def flush(self) -> None: ...


def train_sbi(make: Callable[[], object], theta: Tensor, x: Tensor, budget: float,
              **train_kwargs) -> tuple[object, dict]:
    """Train an sbi trainer for about ``budget`` CPU seconds. sbi counts epochs, so a probe
    prices one: its first epochs absorb the one-time costs (building the net, first calls),
    two more resumed epochs give the price; a fresh trainer then gets ``budget / price``
    epochs at most, with sbi's early stopping still on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum number of epochs")  # the budget, not a fault
        probe = make()
        probe.append_simulations(theta, x)
        probe.train(max_num_epochs=1, **train_kwargs)  # sbi trains epochs 0..max_num_epochs, at least 2
        start = time.process_time()
        probe.train(max_num_epochs=3, resume_training=True, **train_kwargs)
        price = (time.process_time() - start) / 2
        epochs = max(2, int(budget / price))
        inference = make()
        inference.append_simulations(theta, x)
        start = time.process_time()
        inference.train(max_num_epochs=epochs - 1, **train_kwargs)
        spent = time.process_time() - start
    return inference, {"train_cpu_s": spent, "epochs": int(inference.summary["epochs_trained"][-1]),
                       "epoch_budget": epochs}


def build(method: str, args: argparse.Namespace, theta: Tensor, x: Tensor):
    """The trained posterior of ``method`` and its training record."""
    from sbi.inference import FMPE, NPE, DirectPosterior

    quiet = dict(show_progress_bars=False, tracker=NoTracker())
    if method == "NSF (sbi)":
        inference, record = train_sbi(lambda: NPE(prior(), density_estimator="nsf", **quiet), theta, x, args.budget)
        return inference.build_posterior(), record
    if method == "FMPE (sbi)":
        inference, record = train_sbi(lambda: FMPE(prior(), **quiet), theta, x, args.budget)
        return inference.build_posterior(), record
    if method == "CNF by NPE (sbi)":
        builder = partial(build_cnf_estimator, hidden_dims=args.hidden)
        lr = {} if args.npe_lr is None else {"learning_rate": args.npe_lr}
        inference, record = train_sbi(lambda: NPE(prior(), density_estimator=builder, **quiet), theta, x, args.budget,
                                      **lr)
        return inference.build_posterior(), record
    if method == "CNF by flow matching":
        estimator = flow_matching_estimator(theta, x, hidden_dims=args.fm_hidden, max_seconds=args.budget,
                                            lr=args.fm_lr, path=args.fm_path, seed=args.seed,
                                            progress=args.progress)
        record = estimator.training_record
        return DirectPosterior(estimator, prior()), {"train_cpu_s": record["cpu_seconds"], "steps": record["steps"]}
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def evaluate(posterior, observations: list[dict], n: int, seed: int) -> dict:
    """C2ST, NLPD of the true parameters and sampling CPU time over the observations."""
    c2sts, nlpds, sample_s = [], [], 0.0
    for k, obs in enumerate(observations):
        torch.manual_seed(seed + k)
        start = time.process_time()
        samples = posterior.sample((n,), x=obs["x"], show_progress_bars=False)
        sample_s += time.process_time() - start
        obs.setdefault("samples", {})[id(posterior)] = samples
        with torch.no_grad():
            nlpds.append(-posterior.log_prob(obs["theta"], x=obs["x"]).item())
        c2sts.append(c2st(obs["reference"], samples, seed=seed))
    return {"c2st": c2sts, "c2st_mean": float(np.mean(c2sts)), "nlpd": nlpds, "nlpd_mean": float(np.mean(nlpds)),
            "sample_cpu_s": sample_s, "samples": [obs["samples"].pop(id(posterior)) for obs in observations]}


def plot(observations: list[dict], drawn: dict[str, list[Tensor]], path: Path, limit: float = 1.0) -> None:
    rows = ["exact", *drawn]
    fig, axes = plt.subplots(len(rows), len(observations), figsize=(3 * len(observations), 3 * len(rows)),
                             squeeze=False)
    for r, name in enumerate(rows):
        for c, obs in enumerate(observations):
            ax = axes[r][c]
            points = obs["reference"] if name == "exact" else drawn[name][c]
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.3, color="C0" if name == "exact" else "C1")
            ax.scatter(*obs["theta"][0].tolist(), marker="x", color="k", s=40)
            ax.set(xlim=(-limit, limit), ylim=(-limit, limit), xticks=[], yticks=[], aspect="equal")
            ax.set_title(f"{name}, x_o #{c + 1}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training CPU seconds per estimator")
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--observations", type=int, default=3)
    parser.add_argument("--posterior-samples", type=int, default=5000, help="per observation, and as many exact ones")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"CNF by NPE: the field's widths (default: the sbi preset's, {NPE.field['hidden_dims']})")
    parser.add_argument("--npe-lr", type=float, default=None, help="CNF by NPE: sbi's learning rate (its 5e-4)")
    parser.add_argument("--fm-hidden", type=int, nargs="+", default=None,
                        help=f"CNF by flow matching: the field's widths (default: the flow_matching preset's, "
                             f"{FM.field['hidden_dims']})")
    parser.add_argument("--fm-lr", type=float, default=FM.lr,
                        help=f"flow matching: Adam's initial rate ({FM.training['schedule']} schedule; default: "
                             "the flow_matching preset's, %(default)s)")
    parser.add_argument("--fm-path", default=FM.training["path"],
                        help="flow matching: the conditional path (default: the flow_matching preset's, %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="a tqdm bar for flow-matching training")
    parser.add_argument("--out", type=Path, default=Path("out/sbi_posterior"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    generator = torch.Generator().manual_seed(args.seed)
    theta = prior().sample((args.simulations,))
    x = simulate(theta, generator)
    observations = []
    for _ in range(args.observations):
        theta_o = prior().sample((1,))
        x_o = simulate(theta_o, generator)
        accept = acceptance(x_o, generator)
        observations.append({"theta": theta_o, "x": x_o,
                             "reference": reference_samples(x_o, args.posterior_samples, generator),
                             "reference_nlpd": -reference_log_prob(theta_o, x_o, accept).item()})
    metrics: dict = {
        "budget_cpu_s": args.budget, "simulations": args.simulations, "posterior_samples": args.posterior_samples,
        "theta_o": [o["theta"][0].tolist() for o in observations],
        "exact": {"nlpd": [o["reference_nlpd"] for o in observations],
                  "nlpd_mean": float(np.mean([o["reference_nlpd"] for o in observations]))},
    }
    drawn = {}
    for method in args.methods:
        torch.manual_seed(args.seed)
        posterior, record = build(method, args, theta, x)
        scores = evaluate(posterior, observations, args.posterior_samples, args.seed)
        drawn[method] = scores.pop("samples")
        metrics[method] = {**record, **scores}
        print(f"{method:22s} train {record['train_cpu_s']:6.1f} CPU s   C2ST {scores['c2st_mean']:.3f}   "
              f"NLPD {scores['nlpd_mean']:.3f} (exact {metrics['exact']['nlpd_mean']:.3f})   "
              f"sampling {args.observations} x {args.posterior_samples}: {scores['sample_cpu_s']:.2f} CPU s", flush=True)

    plot(observations, drawn, args.out / "posteriors.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
