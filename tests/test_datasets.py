"""Toy densities: shapes, seeding, and the closed-form densities against their samples."""

import math

import pytest
import torch

from pyro_cnf.toy import datasets
from pyro_cnf.toy.datasets import GAUSSIANS_STD, NAMES, sample, true_log_prob

CLOSED_FORM = ("checkerboard", "8gaussians")


def test_names_cover_the_ffjord_toys():
    assert {"8gaussians", "checkerboard", "2spirals", "pinwheel", "moons", "rings"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_device_and_seeding(name):
    x = sample(name, 1000, seed=3)
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, sample(name, 1000, seed=3))
    assert not torch.equal(x, sample(name, 1000, seed=4))
    x64 = sample(name, 1000, seed=3, device="cpu", dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.equal(x64.float(), x)
    assert sample(name, 0).shape == (0, 2)
    # the toys share one scale: most mass inside [-4.5, 4.5]^2, not collapsed to a point
    assert (x.abs() < 4.5).all(-1).float().mean() > 0.99 and (x.std(0) > 0.5).all()


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown dataset 'swissroll'; expected one of 8gaussians, checkerboard"):
        sample("swissroll", 10)
    with pytest.raises(ValueError, match="unknown dataset"):
        true_log_prob("swissroll", torch.zeros(1, 2))


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_counts(n):
    with pytest.raises(ValueError, match="non-negative integer"):
        sample("moons", n)


def test_true_log_prob_bad_input():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\), got \(4, 3\)"):
        true_log_prob("checkerboard", torch.zeros(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        true_log_prob("checkerboard", torch.zeros(4, 2, dtype=torch.long))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in CLOSED_FORM])
def test_no_closed_form_gives_none(name):
    assert true_log_prob(name, torch.zeros(3, 2)) is None


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_true_density_integrates_to_one(name):
    # midpoint rule on [-6, 6]^2; the checkerboard's edges fall on cell boundaries
    n = 600
    h = 12.0 / n
    axis = -6.0 + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    mass = true_log_prob(name, grid).exp().sum().item() * h * h
    assert mass == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_samples_lie_where_the_density_is(name):
    x = sample(name, 5000, seed=1)
    assert torch.isfinite(true_log_prob(name, x)).all()
    if name == "checkerboard":  # the other 8 squares are empty
        assert true_log_prob(name, torch.tensor([[-3.0, -1.0], [1.0, 3.0], [3.0, 1.0]])).isinf().all()


def test_checkerboard_nll_is_log_32():
    x = sample("checkerboard", 10000, seed=2, dtype=torch.float64)
    assert (-true_log_prob("checkerboard", x)).mean().item() == pytest.approx(math.log(32), abs=1e-12)
    # each of the 8 squares gets an eighth of the points
    cell = torch.floor((x + 4) / 2)
    counts = torch.bincount((4 * cell[:, 0] + cell[:, 1]).long(), minlength=16)
    assert counts.sum() == 10000 and (counts > 0).sum() == 8
    assert counts[counts > 0].float().sub(1250).abs().max() < 4 * math.sqrt(1250)


def test_eight_gaussians_nll_is_the_mixture_entropy():
    x = sample("8gaussians", 40000, seed=5, dtype=torch.float64)
    neg = -true_log_prob("8gaussians", x)
    stated = math.log(8) + math.log(2 * math.pi * math.e * GAUSSIANS_STD**2)
    # Monte Carlo: the mean of -log p estimates the entropy within a few standard errors
    assert neg.mean().item() == pytest.approx(stated, abs=4 * neg.std().item() / math.sqrt(len(neg)))
    # and the mixture log-density agrees with torch.distributions' mixture
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(8, dtype=torch.float64)),
        torch.distributions.Independent(
            torch.distributions.Normal(datasets._eight_centres(), GAUSSIANS_STD), 1
        ),
    )
    assert torch.allclose(-neg[:100], mixture.log_prob(x[:100]))
