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
        (dict(train_rtol=-1e-3), "train_rtol must be a finite number >= 0 or None"),
        (dict(train_atol=math.inf), "train_atol must be a finite number >= 0 or None"),
        (dict(train_rtol="1e-3"), "train_rtol must be a finite number >= 0 or None"),
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
    with pytest.raises(ValueError, match="either flow= or settings"):
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


# --- fields that are valid but unusual, and fields that return the wrong thing -----------------


class Constant(nn.Module):
    """f = 1: the map is x + T, the log-det 0; f does not depend on x at all."""

    input_dim = 2

    def forward(self, t, x):
        return torch.ones_like(x)


class TimeOnly(nn.Module):
    """f = w t: depends on a parameter and on t, not on x; the map is x + w T^2 / 2."""

    input_dim = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, t, x):
        return (self.w * t).expand_as(x)


@pytest.mark.parametrize("trace", ["exact", "hutchinson", "auto"])
@pytest.mark.parametrize("grad", [True, False])
def test_field_independent_of_x_has_log_det_zero(trace, grad):
    x = torch.randn(5, 2)
    for field, shift in ((Constant(), torch.ones(2)), (TimeOnly(), torch.tensor([0.25, -0.5]))):
        f = ContinuousFlow(field, trace=trace, T=1.0, rtol=1e-7, atol=1e-7)
        with torch.set_grad_enabled(grad):
            z, ladj = f(x)
        torch.testing.assert_close(z, x + shift)
        torch.testing.assert_close(ladj, torch.zeros(5))
    if grad:  # the parameter still receives its gradient through the map
        field = TimeOnly()
        ContinuousFlow(field, trace=trace)(x)[0].sum().backward()
        torch.testing.assert_close(field.w.grad, torch.full((2,), 5 * 0.5))


@pytest.mark.parametrize(
    "field, error, match",
    [
        (lambda t, x: torch.ones_like(x, dtype=torch.int64), TypeError, "returned torch.int64; expected torch.float32"),
        (lambda t, x: x.double(), TypeError, "returned torch.float64; expected torch.float32"),
        (lambda t, x: (x, x), TypeError, "returned tuple; expected a tensor of shape \\(4, 2\\)"),
        (lambda t, x: x.tolist(), TypeError, "returned list; expected a tensor"),
    ],
)
def test_field_returning_the_wrong_type(field, error, match):
    class Wrapped(nn.Module):
        input_dim = 2

        def forward(self, t, x):
            return field(t, x)

    for trace in ("exact", "hutchinson"):
        with pytest.raises(error, match=match):
            ContinuousFlow(Wrapped(), trace=trace)(torch.randn(4, 2))


def test_divergence_returning_the_wrong_shape():
    class BadDivergence(ODENet):
        def divergence(self, t, x, context=None):
            f, div = super().divergence(t, x, context)
            return f, div[:, None]

    with pytest.raises(ValueError, match=r"divergence\(\) returned shape \(4, 1\); expected one value per sample, \(4,\)"):
        ContinuousFlow(BadDivergence(2, (8,)))(torch.randn(4, 2))


def test_nan_field_is_named_nan():
    class NaNField(nn.Module):
        input_dim = 2

        def forward(self, t, x):
            return x * float("nan")

    with pytest.raises(SolverError, match="the vector field returned NaN or inf at t=0"):
        ContinuousFlow(NaNField(), trace="exact")(torch.randn(4, 2))


def test_non_finite_parameters_are_named_as_the_cause():
    # what a training step with a NaN gradient leaves behind: no solver setting can help
    broken = flow()
    with torch.no_grad():
        broken.vector_field.linears[0].weight[0, 0] = math.nan
    with pytest.raises(SolverError, match=r"parameters hold NaN or inf \(vector_field.linears.0.weight\).*lower the lea"):
        broken(torch.randn(4, 2))


def test_meta_tensors_are_refused():
    with pytest.raises(ValueError, match="meta tensor"):
        flow()(torch.empty(4, 2, device="meta"))


def test_inference_mode():
    x, closed = torch.randn(4, 2), flow()
    with torch.inference_mode():
        z, ladj = closed(x)  # the closed form needs no autograd
    with torch.no_grad():
        torch.testing.assert_close((z, ladj), closed(x))

    class MLP(nn.Module):
        input_dim = 2

        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

        def forward(self, t, x):
            return torch.tanh(self.net(x))

    f = ContinuousFlow(MLP())
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode\(\) forbids: run under torch.no_grad\(\)"):
        f(x)
    with torch.inference_mode():  # no trace, no autograd
        f(x, logdet=False)
    with torch.no_grad():
        f(x)
