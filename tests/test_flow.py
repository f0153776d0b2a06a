"""The core: ContinuousFlow's mathematics, solver settings and counters."""

import math

import pytest
import torch

from pyro_cnf import ACTIVATIONS, ContinuousFlow, ODENet, SolverError
from pyro_cnf.trace import probe_noise
from tests.fields import ClosedLinearField, LinearField, NoDivergence, random_matrix

TIGHT = dict(rtol=1e-10, atol=1e-10, train_rtol=None, train_atol=None)  # as accurate in training


def linear_flow(d=3, field=LinearField, T=1.0, **kw):
    A = random_matrix(d)
    return A, ContinuousFlow(field(A), T=T, **{**TIGHT, **kw})


class TestLinearField:
    """f = A x: the map is expm(A T) and log|det dz/dx| = + T tr A (not minus)."""

    @pytest.mark.parametrize("field", [LinearField, ClosedLinearField])
    @pytest.mark.parametrize("T", [1.0, 0.7])
    @pytest.mark.parametrize("backend", ["auto", "torchdiffeq"])
    def test_map_and_logdet_both_directions(self, field, T, backend):
        A, flow = linear_flow(field=field, T=T, trace="exact", backend=backend)
        x = torch.randn(5, 3, dtype=torch.float64)
        z, ladj = flow(x)
        torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(A * T).t(), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ladj, (T * torch.trace(A)).expand(5), rtol=1e-8, atol=1e-8)
        x2, ladj2 = flow(z, reverse=True)
        torch.testing.assert_close(x2, x, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ladj2, -ladj, rtol=1e-8, atol=1e-8)

    def test_log_density_is_base_plus_integrated_trace(self):
        # p_data is N(0, S) with S = expm(-AT) expm(-AT)^T: compare with the analytic density
        A, flow = linear_flow(trace="exact")
        x = torch.randn(7, 3, dtype=torch.float64)
        z, ladj = flow(x)
        base = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
        M = torch.linalg.matrix_exp(-A)
        data = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), M @ M.t())
        torch.testing.assert_close(base.log_prob(z) + ladj, data.log_prob(x), rtol=1e-8, atol=1e-8)

    def test_float64_error_below_1e8(self):
        A, flow = linear_flow(trace="exact")
        x = torch.randn(64, 3, dtype=torch.float64)
        _, ladj = flow(x)
        assert (ladj - torch.trace(A)).abs().max() < 1e-8

    def test_hutchinson_exact_for_diagonal_field(self):
        # Rademacher probes give e^T D e = tr D exactly for a diagonal D
        A = torch.diag(torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64))
        flow = ContinuousFlow(LinearField(A), trace="hutchinson", **TIGHT)
        _, ladj = flow(torch.randn(4, 3, dtype=torch.float64))
        torch.testing.assert_close(ladj, torch.full((4,), -0.1, dtype=torch.float64))

    def test_time_and_tensors_follow_input_dtype(self):
        seen = []

        class Recording(LinearField):
            def forward(self, t, x):
                seen.append((t.dtype, x.dtype))
                return super().forward(t, x)

        flow = ContinuousFlow(Recording(random_matrix(2)), trace="exact")
        flow(torch.randn(3, 2, dtype=torch.float64))
        assert seen and set(seen) == {(torch.float64, torch.float64)}


class TestClosedFormDivergence:
    """ODENet.divergence equals the autograd trace (float64, 1e-10)."""

    @pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
    @pytest.mark.parametrize("hidden", [(), (7,), (6, 5), (5, 4, 6), (4, 3, 5, 2)])
    @pytest.mark.parametrize("context_dim", [0, 2])
    def test_equals_autograd_trace(self, activation, hidden, context_dim):
        torch.manual_seed(len(hidden) + context_dim)
        net = ODENet(3, hidden, context_dim, activation=activation, zero_init=False).double()
        x = torch.randn(6, 3, dtype=torch.float64)
        ctx = (torch.randn(6, context_dim, dtype=torch.float64),) if context_dim else ()
        t = torch.tensor(0.37, dtype=torch.float64)
        f, div = net.divergence(t, x, *ctx)
        jac = torch.autograd.functional.jacobian(lambda y: net(t, y, *ctx).sum(0), x)
        torch.testing.assert_close(f, net(t, x, *ctx))
        torch.testing.assert_close(div, torch.diagonal(jac, dim1=0, dim2=2).sum(-1), rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
    @pytest.mark.parametrize("hidden", [(), (7,), (6, 5), (5, 4, 6)])
    def test_jvp_equals_autograd(self, activation, hidden):
        torch.manual_seed(len(hidden))
        net = ODENet(3, hidden, 2, activation=activation, zero_init=False).double()
        x, v, c = (torch.randn(6, k, dtype=torch.float64) for k in (3, 3, 2))
        t = torch.tensor(0.8, dtype=torch.float64)
        f, jv = net.jvp(t, x, v, c)
        _, expected = torch.func.jvp(lambda y: net(t, y, c), (x,), (v,))
        torch.testing.assert_close(jv, expected, rtol=1e-10, atol=1e-10)
        f2, div, jv2 = net.divergence_jvp(t, x, v, c)  # one pass, same numbers
        torch.testing.assert_close((f2, div, jv2), (f, net.divergence(t, x, c)[1], jv), rtol=0, atol=0)

    def test_forward_mode_hutchinson_equals_autograd_hutchinson(self):
        torch.manual_seed(0)
        net = ODENet(3, (8, 8), zero_init=False).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        results = []
        for field in (net, NoDivergence(net)):
            flow = ContinuousFlow(field, trace="hutchinson", regularize=True, **TIGHT)
            torch.manual_seed(4)
            z, ladj, stats = flow(x, return_stats=True)
            results.append((z, ladj, stats.kinetic_energy))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)

    def test_regularized_closed_form_equals_autograd(self):
        # divergence_jvp (one pass) against the batched VJP trace
        torch.manual_seed(0)
        net = ODENet(3, (8, 8), zero_init=False).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        results = []
        for field in (net, NoDivergence(net)):
            flow = ContinuousFlow(field, trace="exact", regularize=True, **TIGHT)
            torch.manual_seed(4)
            z, ladj, stats = flow(x, return_stats=True)
            # |J e|^2 (forward mode) and |e^T J|^2 (VJP) are different unbiased estimates of
            # |J|_F^2, so the Frobenius term is compared in its own test, not here.
            loss = ladj.sum() + stats.kinetic_energy.sum()
            results.append((z, ladj, stats.kinetic_energy, *torch.autograd.grad(loss, list(net.parameters()))))
            if field is net:
                frobenius = stats.jacobian_norm
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
        hutchinson = ContinuousFlow(net, trace="hutchinson", regularize=True, **TIGHT)
        torch.manual_seed(4)  # the same probe e: both integrate |J e|^2 by forward mode
        torch.testing.assert_close(hutchinson(x, return_stats=True)[2].jacobian_norm, frobenius)

    @pytest.mark.parametrize("hidden", [(5,), (5, 4), (4, 3, 5)])
    def test_parameter_gradients_equal_autograd_path(self, hidden):
        torch.manual_seed(1)
        net = ODENet(3, hidden, zero_init=False).double()
        x = torch.randn(8, 3, dtype=torch.float64)
        closed = ContinuousFlow(net, trace="exact", **TIGHT)
        vjp = ContinuousFlow(NoDivergence(net), trace="exact", **TIGHT)
        grads = []
        for flow in (closed, vjp):
            net.zero_grad()
            z, ladj = flow(x)
            (ladj.sum() + z.pow(2).sum()).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_per_row_time_matches_scalar_time():
    net = ODENet(3, (8, 8), context_dim=2, zero_init=False)
    x, c, t = torch.randn(5, 3), torch.randn(5, 2), torch.rand(5)
    rows = torch.cat([net(t[i], x[i : i + 1], c[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(net(t, x, c), rows)
    torch.testing.assert_close(net(t[:, None], x, c), rows)


class TestEstimators:
    def test_auto_picks_closed_form_and_never_touches_state_dict(self):
        flow = ContinuousFlow(ODENet(16, (8, 8)))
        keys = set(flow.state_dict())
        assert flow.trace_mode(16) == "closed"
        flow.trace = "hutchinson"
        assert flow.trace_mode(16) == "hutchinson"
        assert set(flow.state_dict()) == keys

    def test_auto_without_closed_form(self):
        flow = ContinuousFlow(NoDivergence(ODENet(16, (8, 8))))
        assert flow.trace_mode(16) == "hutchinson"
        assert flow.trace_mode(2) == "exact"
        flow.eval()
        assert flow.trace_mode(16) == "exact"

    def test_auto_is_exact_whenever_gradients_are_off(self):
        # A stochastic estimate cannot be a training loss under no_grad or inference_mode:
        # there "auto" is exact, even in train mode and above AUTO_EXACT_MAX_DIM.
        torch.manual_seed(0)
        flow = ContinuousFlow(NoDivergence(ODENet(6, (8, 8), zero_init=False)), rtol=1e-7, atol=1e-7)
        assert flow.training and flow.trace_mode(6) == "hutchinson"
        x = torch.randn(5, 6)
        with torch.no_grad():
            assert flow.trace_mode(6) == "exact"
            first, second = flow.log_prob(x), flow.log_prob(x)
            flow.trace = "exact"
            exact = flow.log_prob(x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, exact, rtol=0, atol=0)

    def test_hutchinson_mean_approaches_exact(self):
        torch.manual_seed(0)
        net = ODENet(4, (16, 16), zero_init=False).double()
        x = torch.randn(1, 4, dtype=torch.float64).expand(4000, 4)
        exact = ContinuousFlow(net, trace="exact", rtol=1e-7, atol=1e-7)(x[:1])[1]
        for noise in ("rademacher", "gaussian"):
            hutch = ContinuousFlow(net, trace="hutchinson", noise=noise, method="rk4", steps=20)
            est = hutch(x)[1]
            sem = est.std() / math.sqrt(len(est))
            assert est.std() > 0  # really random
            assert (est.mean() - exact).abs() < 4 * sem + 1e-4

    @pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
    def test_noise_is_drawn_once_per_solve(self, noise):
        # constant Jacobian A: with one probe e the integral is exactly T e^T A e; a
        # probe redrawn at every evaluation would average several draws instead
        A, flow = linear_flow(trace="hutchinson", noise=noise)
        x = torch.randn(6, 3, dtype=torch.float64)
        torch.manual_seed(7)
        _, ladj = flow(x)
        torch.manual_seed(7)
        e = probe_noise(x, noise)
        torch.testing.assert_close(ladj, torch.einsum("bi,ij,bj->b", e, A, e))
        assert flow.nfe > 6


class TestSolver:
    def test_round_trip_and_batch_shapes(self):
        flow = ContinuousFlow(ODENet(2, (16, 16), zero_init=False))
        x = torch.randn(3, 4, 2)
        z, ladj = flow(x)
        assert z.shape == (3, 4, 2) and ladj.shape == (3, 4)
        x2, ladj2 = flow(z, reverse=True)
        torch.testing.assert_close(x2, x, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ladj2, -ladj, atol=1e-3, rtol=1e-3)
        flat = flow(x.reshape(12, 2))[1].reshape(3, 4)
        torch.testing.assert_close(flat, ladj, atol=1e-4, rtol=1e-4)

    def test_unbatched_input(self):
        flow = ContinuousFlow(ODENet(2, (8,), zero_init=False))
        z, ladj = flow(torch.randn(2))
        assert z.shape == (2,) and ladj.shape == ()

    def test_fixed_grid_counts_and_requires_steps(self):
        with pytest.raises(ValueError, match="fixed-grid"):
            ContinuousFlow(ODENet(2), method="rk4")
        for method, per_step in [("euler", 1), ("midpoint", 2), ("rk4", 4)]:
            flow = ContinuousFlow(ODENet(2, (8,)), method=method, steps=5)
            flow(torch.randn(4, 2))
            assert flow.nfe == 5 * per_step

    def test_fixed_grid_converges_to_adaptive(self):
        A, exact = linear_flow(trace="exact")
        rk4 = ContinuousFlow(exact.vector_field, method="rk4", steps=40, trace="exact")
        x = torch.randn(5, 3, dtype=torch.float64)
        torch.testing.assert_close(rk4(x)[0], exact(x)[0], rtol=1e-6, atol=1e-6)

    def test_no_logdet_skips_trace(self):
        calls = []

        class Spy(ODENet):
            def divergence(self, t, x, context=None):
                calls.append(1)
                return super().divergence(t, x, context)

        flow = ContinuousFlow(Spy(2, (8,), zero_init=False))
        x = torch.randn(4, 2)
        y, ladj = flow(x, logdet=False)
        assert ladj is None and not calls
        torch.testing.assert_close(y, flow(x)[0], atol=1e-4, rtol=1e-4)

    def test_empty_batch(self):
        flow = ContinuousFlow(ODENet(2, (8,)))
        z, ladj = flow(torch.zeros(0, 2))
        assert z.shape == (0, 2) and ladj.shape == (0,)

    def test_input_not_modified(self):
        flow = ContinuousFlow(ODENet(2, (8,), zero_init=False))
        x = torch.randn(4, 2)
        copy = x.clone()
        flow(x)
        flow(x, reverse=True)
        assert torch.equal(x, copy) and not x.requires_grad

    def test_identity_at_initialisation(self):
        flow = ContinuousFlow(ODENet(3, (16, 16)))
        x = torch.randn(5, 3)
        z, ladj = flow(x)
        torch.testing.assert_close(z, x)  # up to the solver's interpolation round-off
        assert torch.equal(ladj, torch.zeros(5))

    def test_per_sample_error_norm_makes_density_batch_independent(self):
        torch.manual_seed(0)
        net = ODENet(2, (32, 32), zero_init=False)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(3)
        x = torch.cat([torch.randn(255, 2) * 0.1, torch.tensor([[3.0, -3.0]])])
        tol = 1e-5
        ref = ContinuousFlow(net.double(), rtol=1e-10, atol=1e-10)(x[-1:].double())[1]
        net.float()
        for norm in ("mixed", "per_sample"):
            flow = ContinuousFlow(net, rtol=tol, atol=tol, error_norm=norm)
            batch = flow(x)[1][-1]
            alone = flow(x[-1:])[1][0]
            if norm == "per_sample":
                assert (batch - alone).abs() < 50 * tol
                assert (batch.double() - ref).abs() < 50 * tol

    def test_regularisers_on_linear_field(self):
        a, d, T = 0.4, 3, 0.8
        flow = ContinuousFlow(LinearField(a * torch.eye(d, dtype=torch.float64)), T=T, regularize=True, **TIGHT)
        x = torch.randn(6, d, dtype=torch.float64)
        for reverse in (False, True):
            stats = flow(x, reverse=reverse, return_stats=True)[2]
            rate = -a if reverse else a
            kinetic = a**2 * x.pow(2).sum(-1) * (math.exp(2 * rate * T) - 1) / (2 * rate)
            torch.testing.assert_close(stats.kinetic_energy, kinetic)
            # Rademacher e: |e^T (aI)|^2 = a^2 d
            torch.testing.assert_close(stats.jacobian_norm, torch.full((6,), a**2 * d * T, dtype=torch.float64))


class TestTrainingTolerance:
    """A solve differentiated in training mode runs at the looser ``train_rtol``/``train_atol``;
    ``eval()`` and ``no_grad()`` keep ``rtol``/``atol``."""

    @staticmethod
    def solves(flow, x):
        """(map, NFE) of a training solve, a no-grad solve and an eval-mode solve."""
        out = []
        for mode, grad in (("train", True), ("train", False), ("eval", True)):
            getattr(flow, mode)()
            with torch.set_grad_enabled(grad):
                z = flow(x)[0]
            out.append((z.detach(), flow.nfe))
        return out

    def test_loose_and_cheap_in_training_accurate_otherwise(self):
        A = random_matrix(3)
        flow = ContinuousFlow(LinearField(A), trace="exact")  # the defaults: 1e-5, training 1e-3
        x = torch.randn(64, 3, dtype=torch.float64)
        exact = x @ torch.linalg.matrix_exp(A).t()
        (z_train, nfe_train), (z_nograd, nfe_nograd), (z_eval, nfe_eval) = self.solves(flow, x)
        assert nfe_train < nfe_nograd == nfe_eval
        torch.testing.assert_close(z_nograd, z_eval, rtol=0, atol=0)
        # Each accepted step's local error is at most atol + rtol |y| in the error norm (an RMS,
        # so at most sqrt(numel) times that per entry), and the map is Lipschitz with constant
        # exp(||A||): the global error is at most steps * that * exp(||A||) (dopri5: 6 NFE a step).
        lipschitz = math.exp(torch.linalg.matrix_norm(A, 2))
        scale = 1 + exact.abs().max()
        for z, nfe, tol in ((z_train, nfe_train, 1e-3), (z_eval, nfe_eval, 1e-5)):
            bound = (nfe / 6) * tol * scale * math.sqrt(x.numel()) * lipschitz
            assert (z - exact).abs().max() <= bound
        assert (z_eval - exact).abs().max() < (z_train - exact).abs().max()

    @pytest.mark.parametrize("given", [dict(rtol=1e-8, atol=1e-8), dict(rtol=1e-2, atol=1e-2), dict(rtol=1e-8)])
    def test_a_given_tolerance_applies_to_training_too(self, given):
        x = torch.randn(64, 3, dtype=torch.float64)
        flow = ContinuousFlow(LinearField(random_matrix(3)), **given)
        (z_train, nfe_train), _, (z_eval, nfe_eval) = self.solves(flow, x)
        assert nfe_train == nfe_eval
        torch.testing.assert_close(z_train, z_eval, rtol=0, atol=0)
        assert (flow.train_rtol, flow.train_atol) == (flow.rtol, flow.atol)

    def test_a_given_training_tolerance_applies_in_training_only(self):
        x = torch.randn(64, 3, dtype=torch.float64)
        flow = ContinuousFlow(LinearField(random_matrix(3)), rtol=1e-8, atol=1e-8, train_rtol=1e-3, train_atol=1e-3)
        (_, nfe_train), _, (_, nfe_eval) = self.solves(flow, x)
        assert nfe_train < nfe_eval
        assert flow.solver.tolerances(training=True) == (1e-3, 1e-3)

    @pytest.mark.parametrize("tol", [1e-6, 1e-9])
    def test_linear_field_in_training_under_grad_to_the_given_tolerance(self, tol):
        # f = A x: the map is expm(A T) and the log-det T tr A, whatever the mode
        torch.manual_seed(1)
        A, T = random_matrix(3), 0.7
        flow = ContinuousFlow(LinearField(A), T=T, trace="exact", rtol=tol, atol=tol).train()
        x = torch.randn(32, 3, dtype=torch.float64, requires_grad=True)
        z, ladj = flow(x)
        assert z.requires_grad
        exact = x.detach() @ torch.linalg.matrix_exp(A * T).t()
        # measured: 0.2 tol; the training default (1e-3) would miss by two orders and more
        assert (z.detach() - exact).abs().max() < 10 * tol
        assert (ladj.detach() - T * torch.trace(A)).abs().max() < 10 * tol

    def test_assigning_a_tolerance_gives_it(self):
        flow = ContinuousFlow(LinearField(random_matrix(3)))
        assert (flow.rtol, flow.train_rtol) == (1e-5, 1e-3)
        flow.rtol = flow.atol = 1e-7
        assert flow.solver.tolerances(training=True) == (1e-7, 1e-7)

    def test_a_training_solve_that_fails_names_its_tolerances(self):
        flow = ContinuousFlow(LinearField(8 * random_matrix(3)), options={"max_num_steps": 2})
        x = torch.randn(5, 3, dtype=torch.float64)
        with pytest.raises(SolverError, match="rtol=0.001, atol=0.001"):
            flow(x)
        with pytest.raises(SolverError, match="rtol=1e-05, atol=1e-05"), torch.no_grad():
            flow(x)


class TestGradients:
    def test_the_users_adjoint_options_merge_into_the_defaults(self):
        flow = ContinuousFlow(ODENet(2, (8,)), adjoint=True, adjoint_options={"max_num_steps": 7})
        assert flow.solver.adjoint_options == {"norm": "seminorm", "max_num_steps": 7}
        assert ContinuousFlow(ODENet(2, (8,)), adjoint=True).solver.adjoint_options == {"norm": "seminorm"}

    def test_the_adjoints_backward_solve_keeps_the_step_budget(self):
        torch.manual_seed(0)
        net = ODENet(2, (16, 16), zero_init=False, scale_rate=0.0)
        with torch.no_grad():  # a field that needs tens of steps, twice as many backwards
            for p in net.linears.parameters():
                p.mul_(4)
        x = torch.randn(64, 2)
        free = ContinuousFlow(net, adjoint=True, rtol=1e-5, atol=1e-5, trace="exact")
        z, ladj = free(x)
        (z.sum() + ladj.sum()).backward()
        assert free.nfe < 6 * 45 < free.nfe_backward  # 45 steps cover the forward solve, not the backward
        capped = ContinuousFlow(net, adjoint=True, rtol=1e-5, atol=1e-5, trace="exact", options={"max_num_steps": 45})
        z, ladj = capped(x)
        with pytest.raises(SolverError, match=r"adjoint \(backward\) solve: max_num_steps exceeded"):
            (z.sum() + ladj.sum()).backward()

    @pytest.mark.parametrize("trace", ["exact", "hutchinson"])
    def test_adjoint_matches_direct(self, trace):
        torch.manual_seed(0)
        net = NoDivergence(ODENet(2, (16, 16), context_dim=1, zero_init=False)).double()
        x = torch.randn(10, 2, dtype=torch.float64, requires_grad=True)
        ctx = torch.randn(10, 1, dtype=torch.float64, requires_grad=True)
        grads = []
        for adjoint in (False, True):
            flow = ContinuousFlow(net, trace=trace, adjoint=adjoint, rtol=1e-9, atol=1e-9, train_rtol=None, train_atol=None)
            torch.manual_seed(3)  # same Hutchinson probes
            z, ladj = flow(x, ctx)
            loss = (ladj - 0.5 * z.pow(2).sum(-1)).sum()
            grads.append(torch.autograd.grad(loss, [x, ctx, *net.parameters()]))
            if adjoint:
                assert flow.nfe_backward > 0
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def test_fixed_grid_adjoint_uses_the_forward_grid(self):
        torch.manual_seed(0)
        net = ODENet(3, (16, 16), zero_init=False).double()
        with torch.no_grad():
            net.time_gate.mul_(10)
        x = torch.randn(8, 3, dtype=torch.float64)
        grads = []
        for adjoint in (False, True):
            flow = ContinuousFlow(net, method="rk4", steps=6, adjoint=adjoint)
            z, ladj = flow(x)
            grads.append(torch.autograd.grad((ladj - 0.5 * z.pow(2).sum(-1)).sum(), list(net.parameters())))
        assert flow.nfe_backward == 4 * 6
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)

    def test_gradients_in_eval_mode(self):
        flow = ContinuousFlow(ODENet(2, (8,), zero_init=False)).eval()
        _, ladj = flow(torch.randn(4, 2))
        ladj.sum().backward()
        assert all(p.grad is not None for p in flow.parameters())

    def test_state_dict_round_trip(self):
        a = ContinuousFlow(ODENet(2, (8, 8), zero_init=False))
        b = ContinuousFlow(ODENet(2, (8, 8)))
        b.load_state_dict(a.state_dict())
        x = torch.randn(5, 2)
        torch.testing.assert_close(a(x)[1], b(x)[1])


@pytest.mark.parametrize("regularize", [False, True])
def test_deepcopy_after_a_call_with_gradients(regularize):
    # Nothing of a call (non-leaf tensors: RNODE integrals, the context) stays on the module.
    import copy

    flow = ContinuousFlow(ODENet(2, (8,), context_dim=1, zero_init=False), regularize=regularize)
    context = torch.randn(4, 1, requires_grad=True)
    z, ladj, stats = flow(torch.randn(4, 2), context * 2, return_stats=True)
    (ladj.sum() + (stats.kinetic_energy.sum() if regularize else 0)).backward()
    twin = copy.deepcopy(flow)
    x, c = torch.randn(3, 2), torch.randn(3, 1)
    outputs = []
    for module in (twin, flow):
        torch.manual_seed(1)  # the same RNODE probes
        outputs.append(module(x, c))
    torch.testing.assert_close(*outputs)
