"""Bad input and solver failure end in a clear exception, never a silent wrong number."""

import math

import pytest
import torch
from torch import nn

from pyro_cnf import CNF, CNFTransform, ConditionalCNF, ContinuousFlow, ODENet, SolverError


def flow(context_dim=0, **kw):
    return ContinuousFlow(ODENet(2, (8,), context_dim=context_dim, zero_init=False), **kw)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(4, 3), ValueError, r"shape \(\.\.\., 2\), got \(4, 3\)"),
        (torch.randn(()), ValueError, "shape"),
        (torch.tensor([[0.0, float("nan")]]), ValueError, "NaN or inf"),
        (torch.tensor([[0.0, float("inf")]]), ValueError, "NaN or inf"),
        (torch.ones(4, 2, dtype=torch.int64), TypeError, "float32 or float64, got torch.int64"),
        (torch.ones(4, 2, dtype=torch.bool), TypeError, "float32 or float64"),
        (torch.ones(4, 2, dtype=torch.float16), TypeError, "float32 or float64"),
        (torch.randn(4, 2, dtype=torch.float64), TypeError, "parameters are torch.float32"),
        ([[0.0, 1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(x, error, match):
    f = flow()
    with pytest.raises(error, match=match):
        f(x)
    with pytest.raises(error, match=match):
        f(x, reverse=True)


@pytest.mark.parametrize(
    "context, error, match",
    [
        (None, ValueError, r"conditional: pass context of shape \(\.\.\., 3\)"),
        (torch.randn(4, 2), ValueError, r"context must have shape \(\.\.\., 3\)"),
        (torch.randn(5, 3), ValueError, "does not broadcast"),
        (torch.full((4, 3), float("nan")), ValueError, "context contains NaN"),
        (torch.randn(4, 3, dtype=torch.float64), TypeError, "context is torch.float64"),
        ("ctx", TypeError, "context must be a torch.Tensor"),
    ],
)
def test_bad_context(context, error, match):
    with pytest.raises(error, match=match):
        flow(context_dim=3)(torch.randn(4, 2), context)


def test_context_for_unconditional_flow():
    with pytest.raises(ValueError, match="not conditional"):
        flow()(torch.randn(4, 2), torch.randn(4, 3))


def test_field_returning_wrong_shape():
    class Bad(nn.Module):
        def forward(self, t, x):
            return x[:, :1]

    for trace in ("exact", "hutchinson"):
        with pytest.raises(ValueError, match=r"returned shape \(4, 1\); expected the shape of x, \(4, 2\)"):
            ContinuousFlow(Bad(), trace=trace)(torch.randn(4, 2))
    with pytest.raises(ValueError, match="returned shape"):
        ContinuousFlow(Bad())(torch.randn(4, 2), logdet=False)


class Explosive(nn.Module):
    """dx/dt = x^2 blows up at t = 1/x0: no solver can pass it."""

    input_dim = 1

    def forward(self, t, x):
        return x * x


def test_step_size_underflow_raises_solver_error():
    with pytest.raises(SolverError, match=r"data -> base.*underflow in dt.*Try looser tolerances") as info:
        ContinuousFlow(Explosive(), trace="exact", options={"max_num_steps": 10**6})(torch.full((2, 1), 2.0))
    assert isinstance(info.value, RuntimeError)


def test_step_budget_raises_solver_error():
    f = ContinuousFlow(Explosive(), trace="exact", options={"max_num_steps": 5})
    with pytest.raises(SolverError, match=r"max_num_steps exceeded \(5>=5\); last t evaluated [0-9.]+, \d+ function evaluations"):
        f(torch.full((2, 1), 2.0))


def test_fixed_grid_blow_up_raises_solver_error():
    f = ContinuousFlow(Explosive(), trace="exact", method="euler", steps=4)
    with pytest.raises(SolverError, match="not finite"):
        f(torch.full((2, 1), 1e30))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="rk45"), "unknown method 'rk45'"),
        (dict(method="euler"), "fixed-grid solver: pass steps=N"),
        (dict(method="rk4", steps=0), "positive integer"),
        (dict(method="bosh3", steps=4), "only pyro_cnf's own dopri5"),
        (dict(method="dopri5", steps=4, adjoint=True), "only pyro_cnf's own dopri5"),
        (dict(method="dopri5", steps=2.5), "positive integer"),
        (dict(error_norm="max"), "error_norm must be"),
        (dict(T=0.0), r"T must be a finite number > 0"),
        (dict(T=math.inf), r"T must be a finite number > 0"),
        (dict(rtol=-1e-5), "rtol must be a finite number >= 0"),
        (dict(atol=math.nan), "atol must be a finite number >= 0"),
        (dict(rtol=0.0, atol=0.0), "both 0"),
        (dict(trace="bogus"), "trace must be one of"),
        (dict(noise="uniform"), "noise must be one of"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow(**kwargs)


def test_settings_assigned_later_are_validated_when_assigned():
    # Validated once, when set, not in the middle of a solve: a bad trace used to pass
    # unnoticed while logdet=False skipped the estimator.
    f = flow()
    with pytest.raises(ValueError, match="trace must be one of"):
        f.trace = "approx"
    with pytest.raises(ValueError, match="noise must be one of"):
        f.noise = "uniform"
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        f.rtol = -1.0
    with pytest.raises(ValueError, match="fixed-grid solver: pass steps=N"):
        f.method = "rk4"
    assert (f.trace, f.noise, f.rtol, f.method) == ("auto", "rademacher", 1e-5, "dopri5")
    f.rtol = f.atol = 1e-3  # valid changes take effect
    assert f.solver.rtol == f.solver.atol == 1e-3


def test_adapters_check_dimensions():
    with pytest.raises(ValueError, match="input_dim=3 but the flow's field has input_dim=2"):
        CNF(3, flow=flow())
    with pytest.raises(ValueError, match="input_dim=3"):
        CNFTransform(3, flow=flow())
    with pytest.raises(ValueError, match="either flow= or flow settings"):
        CNF(2, flow=flow(), trace="exact")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        CNF(2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="conditional"):
        ConditionalCNF(2, 3).condition(None)(torch.randn(4, 2))


@pytest.mark.parametrize(
    "other, match",
    [
        (dict(input_dim=3, hidden_dims=(8,)), "input_dim: checkpoint 2, this net 3"),
        (dict(input_dim=2, hidden_dims=(8, 8)), r"hidden_dims: checkpoint \(8,\), this net \(8, 8\)"),
        (dict(input_dim=2, hidden_dims=(8,), activation="tanh"), "activation"),
    ],
)
def test_mismatched_state_dict_names_the_mismatch(other, match):
    saved = CNF(2, hidden_dims=(8,)).state_dict()
    with pytest.raises(ValueError, match=match):
        CNF(other.pop("input_dim"), **other).load_state_dict(saved)
