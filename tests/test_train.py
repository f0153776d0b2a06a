"""Training helpers: the shared loops, and the resumable, checkpointed trainer."""

import math

import pytest
import torch

from pyro_cnf import ContinuousFlow, ODENet
from pyro_cnf.train import fit_density, nll, progress_loop


def standard_normal_flow_log_prob(flow):
    def log_prob(x, context=None):
        z, ladj = flow(x, context)
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + ladj

    return log_prob


# --- progress_loop, nll, fit_density ---------------------------------------------------------


def test_progress_loop_runs_start_to_steps_and_returns_metrics():
    seen = []
    history = progress_loop(lambda i: seen.append(i) or {"i": i, "half": i / 2}, 7, start=3, disable=True)
    assert seen == [3, 4, 5, 6]
    assert history == [{"i": float(i), "half": i / 2} for i in seen]
    assert progress_loop(lambda i: {}, 3, start=3, disable=True) == []
    with pytest.raises(ValueError, match="steps must be >= start"):
        progress_loop(lambda i: {}, 2, start=3)


def test_nll_matches_manual_computation_in_any_batching():
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), scale)
    data = torch.randn(103, 2, dtype=torch.float64) * scale
    manual = -normal.log_prob(data).sum(-1).mean().item()
    for batch_size in (1, 10, 103, 4096):
        assert nll(lambda x, c: normal.log_prob(x).sum(-1), data, batch_size=batch_size) == pytest.approx(manual, abs=1e-12)


def test_nll_passes_context_row_by_row():
    data, context = torch.zeros(5, 1), torch.arange(5.0).unsqueeze(-1)
    # log p(x | c) = -c: the NLL is the mean context
    assert nll(lambda x, c: -c.squeeze(-1), data, context, batch_size=2) == pytest.approx(2.0)


def test_fit_density_decreases_nll_of_a_cnf():
    torch.manual_seed(0)
    data = torch.randn(512, 2) * torch.tensor([0.5, 1.5]) + torch.tensor([2.0, -1.0])
    flow = ContinuousFlow(ODENet(2, (16, 16)), method="rk4", steps=4)
    log_prob = standard_normal_flow_log_prob(flow)
    before = nll(log_prob, data)
    history = fit_density(log_prob, flow.parameters(), data, steps=60, batch_size=128, lr=2e-2, desc="")
    after = nll(log_prob, data)
    assert len(history) == 60 and set(history[0]) == {"loss", "nll"}
    # the exact NLL of the data-generating Gaussian bounds what a model can reach
    entropy = 0.5 * 2 * math.log(2 * math.pi * math.e) + math.log(0.5 * 1.5)
    assert after < before - 1.0 and after > entropy - 0.1


def test_fit_density_adds_the_penalty_and_seeds_its_minibatches():
    data = torch.randn(64, 1)

    def run(seed):
        mu = torch.nn.Parameter(torch.zeros(1))
        seen = []

        def log_prob(x, c):
            seen.append(x.clone())
            return -(x - mu).pow(2).sum(-1)

        history = fit_density(log_prob, [mu], data, steps=3, batch_size=8, seed=seed, desc="",
                              penalty=lambda: mu.pow(2).sum() + 1.0)
        return seen, history

    a, history = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert history[0]["loss"] == pytest.approx(history[0]["nll"] + history[0]["penalty"])
    assert history[0]["penalty"] == pytest.approx(1.0)  # mu = 0 at the first step


def test_fit_density_bad_input():
    mu = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(N >= 1, d\)"):
        fit_density(lambda x, c: x.sum(-1), [mu], torch.zeros(3), steps=1)
    with pytest.raises(ValueError, match="one row per data row"):
        fit_density(lambda x, c: x.sum(-1), [mu], torch.zeros(3, 1), context=torch.zeros(2, 1), steps=1)
