"""pyro_cnf.ode:  convergence orders, agreement with torchdiffeq, failures."""

import math

import pytest
import torch
from torchdiffeq import odeint

from pyro_cnf import ContinuousFlow, ODENet, SolverError
from pyro_cnf.ode.rk import METHODS, integrate
from tests.fields import LinearField, random_matrix


def decay(t, y):
    return -y


ONE = torch.ones(4, dtype=torch.float64)


@pytest.mark.parametrize("method, order, n", [("euler", 1, 20), ("midpoint", 2, 20), ("rk4", 4, 20), ("dopri5", 5, 16)])
def test_fixed_grid_convergence_order(method, order, n):
    errors = [(integrate(decay, ONE, 0.0, 1.0, method=method, steps=k) - math.exp(-1)).abs().max() for k in (n, 2 * n)]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


def test_fixed_dopri5_reuses_the_last_stage():
    flow = ContinuousFlow(ODENet(2, (8,)), method="dopri5", steps=3)
    flow(torch.randn(4, 2))
    assert flow.nfe == 6 * 3 + 1


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_grid_equals_torchdiffeq(method):
    # Same tableau (torchdiffeq's rk4 is the 3/8 rule) on a nonlinear, time-dependent field.
    torch.manual_seed(0)
    net = ODENet(3, (8, 8), zero_init=False).double()
    y0 = torch.randn(5, 3, dtype=torch.float64)
    for t0, t1 in ((0.0, 1.0), (1.0, 0.0)):
        ours = integrate(net, y0, t0, t1, method=method, steps=7)
        t = torch.tensor([t0, t1], dtype=torch.float64)
        theirs = odeint(net, y0, t, method=method, options={"step_size": abs(t1 - t0) / 7})[-1]
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tol", [1e-4, 1e-7, 1e-10])
def test_dopri5_meets_tolerance_both_directions(tol):
    A = random_matrix(3)
    y0 = torch.randn(6, 3, dtype=torch.float64)
    for t0, t1 in ((0.0, 1.3), (1.3, 0.0)):
        y = integrate(lambda t, y: y @ A.t(), y0, t0, t1, rtol=tol, atol=tol)
        exact = y0 @ torch.linalg.matrix_exp(A * (t1 - t0)).t()
        assert (y - exact).abs().max() < 50 * tol


def test_dopri5_agrees_with_torchdiffeq_and_lands_on_the_end_time():
    torch.manual_seed(1)
    net = ODENet(2, (16, 16), zero_init=False).double()
    y0 = torch.randn(8, 2, dtype=torch.float64)
    times = []

    def recording(t, y):
        times.append(float(t))
        return net(t, y)

    ours = integrate(recording, y0, 0.0, 0.8, rtol=1e-10, atol=1e-10)
    theirs = odeint(net, y0, torch.tensor([0.0, 0.8], dtype=torch.float64), rtol=1e-11, atol=1e-11)[-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-8)
    assert max(times) == 0.8 and min(times) == 0.0


def test_adaptive_step_count_reacts_to_tolerance():
    calls = []

    def counted(t, y):
        calls.append(1)
        return decay(t, y)

    counts = []
    for tol in (1e-3, 1e-8):
        calls.clear()
        integrate(counted, ONE, 0.0, 1.0, rtol=tol, atol=tol)
        counts.append(len(calls))
    assert counts[1] > 2 * counts[0]


def test_budget_and_underflow_raise():
    blow_up = lambda t, y: y * y  # noqa: E731  y(t) = 1 / (1/y0 - t) leaves at t = 1/y0
    with pytest.raises(SolverError, match=r"max_num_steps exceeded \(3>=3\)"):
        integrate(blow_up, ONE * 2, 0.0, 1.0, max_num_steps=3)
    with pytest.raises(SolverError, match="underflow in dt"):
        integrate(blow_up, ONE * 2, 0.0, 1.0, max_num_steps=10**6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method 'rk45'"):
        integrate(decay, ONE, 0.0, 1.0, method="rk45")
    with pytest.raises(ValueError, match="on a fixed grid: pass steps >= 1"):
        integrate(decay, ONE, 0.0, 1.0, method="rk4")


def test_dopri5_tableau_is_consistent():
    tab = METHODS["dopri5"]
    for c, row in zip(tab.c[1:], tab.a):
        assert sum(row) == pytest.approx(c, abs=1e-15)
    assert sum(tab.b) == pytest.approx(1.0, abs=1e-15) and sum(tab.e) == pytest.approx(0.0, abs=1e-15)
    assert tab.fsal


class TestFlowBackends:
    """ContinuousFlow picks the own solver only where it applies; both backends agree."""

    def test_which_backend(self):
        field = ODENet(2, (8,))
        assert ContinuousFlow(field).uses_own_solver()
        assert ContinuousFlow(field, method="rk4", steps=4).uses_own_solver()
        assert not ContinuousFlow(field, backend="torchdiffeq").uses_own_solver()
        assert not ContinuousFlow(field, adjoint=True).uses_own_solver()
        assert not ContinuousFlow(field, method="bosh3").uses_own_solver()
        assert not ContinuousFlow(field, method="rk4", options={"step_size": 0.25}).uses_own_solver()
        with pytest.raises(ValueError, match="backend must be"):
            ContinuousFlow(field, backend="scipy")

    @pytest.mark.parametrize("trace", ["exact", "hutchinson"])
    @pytest.mark.parametrize("error_norm", ["mixed", "per_sample"])
    def test_backends_agree_with_regularisation(self, trace, error_norm):
        torch.manual_seed(0)
        net = ODENet(3, (8, 8), zero_init=False).double()
        x = torch.randn(6, 3, dtype=torch.float64)
        out = []
        for backend in ("auto", "torchdiffeq"):
            flow = ContinuousFlow(net, trace=trace, backend=backend, regularize=True, error_norm=error_norm,
                                  rtol=1e-10, atol=1e-10, train_rtol=None, train_atol=None)
            torch.manual_seed(5)
            z, ladj, stats = flow(x, return_stats=True)
            out.append((z, ladj, stats.kinetic_energy, stats.jacobian_norm))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)

    def test_solver_error_from_own_solver_names_the_solve(self):
        flow = ContinuousFlow(LinearField(torch.eye(1) * 1e3), trace="exact", options={"max_num_steps": 4})
        with pytest.raises(SolverError, match=r"base -> data.*max_num_steps exceeded.*method='dopri5'"):
            flow(torch.ones(2, 1), reverse=True)


def test_adjoint_backward_failure_raises_solver_error():
    torch.manual_seed(0)
    net = ODENet(2, (8, 8), zero_init=False)
    flow = ContinuousFlow(net, adjoint=True, rtol=1e-8, atol=1e-8, train_rtol=None, train_atol=None, adjoint_options={"max_num_steps": 2})
    z, ladj = flow(torch.randn(4, 2))
    with pytest.raises(SolverError, match=r"base -> data.*adjoint \(backward\) solve: max_num_steps exceeded"):
        ladj.sum().backward()


class TestInitialStep:
    """The first trial step: the whole interval when one step can cover it, else T/10."""

    def counted(self, a: float):
        calls = []

        def field(t, y):
            calls.append(float(t))
            return a * y

        return field, calls

    @pytest.mark.parametrize("a", [0.0, 0.01, -0.05])
    def test_slow_linear_field_takes_one_step(self, a):
        # y' = a y: rate = |a| and d1 = |a| |y| / (atol + rtol |y|), so the error model is
        # |a|^5 / tol << 1e3: one step over [0, 1], 7 evaluations (the probe is stage 2).
        field, calls = self.counted(a)
        y = integrate(field, ONE, 0.0, 1.0, rtol=1e-6, atol=1e-6)
        assert len(calls) == 7 and max(calls) == 1.0
        torch.testing.assert_close(y, ONE * math.exp(a), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
    def test_fast_field_pays_one_probe_over_a_tenth(self, t0, t1):
        # y' = 4 y at 1e-6: 4^5 / 1e-6 >> 1e3, so the first step is (t1 - t0) / 10, and the
        # solve is the one that starts there, plus the probe evaluation.
        field, calls = self.counted(4.0)
        y = integrate(field, ONE, t0, t1, rtol=1e-6, atol=1e-6)
        n_rule = len(calls)
        calls.clear()
        y_tenth = integrate(field, ONE, t0, t1, rtol=1e-6, atol=1e-6, first_step=0.1)
        assert n_rule == len(calls) + 1
        torch.testing.assert_close(y, y_tenth, rtol=0, atol=0)
        torch.testing.assert_close(y, ONE * math.exp(4.0 * (t1 - t0)), rtol=1e-4, atol=0)

    def test_new_random_flow_costs_one_step(self):
        torch.manual_seed(0)
        for d in (2, 64):
            flow = ContinuousFlow(ODENet(d, (64, 64), zero_init=False))
            flow(torch.randn(256, d))
            assert flow.nfe == 7

    def test_rule(self):
        from pyro_cnf.ode.rk import initial_step

        assert initial_step(0.0, 0.0, -2.0, order=5) == -2.0
        assert initial_step(1e4, 0.05, 1.0, order=5) == 1.0  # 1e4 * 0.05^4 = 0.06 <= 1e3
        assert initial_step(1e4, 3.0, 1.0, order=5) == 0.1  # 1e4 * 81 > 1e3
        assert initial_step(1e4, 0.05, 2.0, order=5) == 2.0  # 2^5 * 0.06 = 2 <= 1e3
        assert initial_step(1e4, 0.05, 8.0, order=5) == 0.8  # 8^5 * 0.06 = 2e3 > 1e3


def test_adjoint_supports_a_second_backward_through_the_graph():
    # torch.autograd.functional.jacobian backpropagates through one graph once per output;
    # the adjoint guard must keep its inner graph for that, as odeint_adjoint does.
    torch.manual_seed(0)
    net = ODENet(2, (8, 8), zero_init=False).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    jacobians = []
    for adjoint in (False, True):
        flow = ContinuousFlow(net, adjoint=adjoint, rtol=1e-10, atol=1e-10, train_rtol=None, train_atol=None)
        jacobians.append(torch.autograd.functional.jacobian(lambda v: flow(v)[1], x))
    torch.testing.assert_close(jacobians[1], jacobians[0], rtol=1e-6, atol=1e-6)
    z, ladj = ContinuousFlow(net, adjoint=True)(x.requires_grad_())
    ladj.sum().backward(retain_graph=True)
    ladj.sum().backward()  # used to fail: "Trying to backward through the graph a second time"
