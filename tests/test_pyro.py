"""The Pyro adapters: conventions, caching (one solve per SVI step), SVI, conditioning."""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import iterated
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyro_cnf
from pyro_cnf.presets import PRESETS
from pyro_cnf import CNF, ConditionalCNF, ContinuousFlow, ODENet, cnf


def base(d, dtype=torch.float32):
    return dist.Normal(torch.zeros(d, dtype=dtype), torch.ones(d, dtype=dtype)).to_event(1)


def small_cnf(d=2, context_dim=0, **kw):
    torch.manual_seed(0)
    field = ODENet(d, (16, 16), context_dim=context_dim, zero_init=False)
    return ContinuousFlow(field, **kw)


class SolveCounter:
    """Counts calls of ContinuousFlow.forward (one call = one ODE solve); ``logdets``
    records whether each integrated the log-determinant."""

    def __init__(self, flow, monkeypatch):
        self.calls = 0
        self.logdets = []
        original = flow.forward

        def counted(*args, **kwargs):
            self.calls += 1
            self.logdets.append(kwargs.get("logdet", True))
            return original(*args, **kwargs)

        monkeypatch.setattr(flow, "forward", counted)


class TestConventions:
    def test_is_a_transform_module(self):
        t = CNF(3)
        assert isinstance(t, pyro.distributions.torch_transform.TransformModule)
        assert t.event_dim == 1 and t.bijective
        assert t.domain == t.codomain == torch.distributions.constraints.real_vector
        assert isinstance(t.flow, ContinuousFlow)

    def test_sample_rsample_and_batch_shapes(self):
        t = CNF(2, flow=small_cnf())
        d = dist.TransformedDistribution(base(2), [t])
        assert d.sample((3, 4)).shape == (3, 4, 2)
        x = d.rsample((5,))
        x.sum().backward()
        assert all(p.grad is not None for p in t.parameters())
        assert d.log_prob(torch.randn(3, 4, 2)).shape == (3, 4)

    def test_density_integrates_to_one(self):
        t = CNF(2, flow=small_cnf(rtol=1e-6, atol=1e-6))
        d = dist.TransformedDistribution(base(2), [t])
        grid = torch.linspace(-7, 7, 141)
        xy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
        with torch.no_grad():
            mass = d.log_prob(xy).exp().sum() * (grid[1] - grid[0]) ** 2
        assert abs(mass.item() - 1) < 0.01

    def test_iterated_and_with_cache(self):
        t = iterated(2, cnf, 2, hidden_dims=[8])
        lp = dist.TransformedDistribution(base(2), [t]).log_prob(torch.randn(3, 2))
        assert lp.shape == (3,) and torch.isfinite(lp).all()
        c = CNF(2)
        uncached = c.with_cache(0)
        assert uncached.flow is c.flow and uncached._cache_size == 0
        z = torch.randn(2, 2)
        torch.testing.assert_close(uncached.log_abs_det_jacobian(z, uncached(z)), c.log_abs_det_jacobian(z, c(z)))


class TestOneSolve:
    def test_rsample_then_log_prob_is_one_solve(self, monkeypatch):
        t = CNF(2, flow=small_cnf())
        counter = SolveCounter(t.flow, monkeypatch)
        d = dist.TransformedDistribution(base(2), [t])
        x = d.rsample((8,))
        d.log_prob(x)
        assert counter.calls == 1
        d.log_prob(torch.randn(8, 2))  # data not produced by the flow: one inverse solve
        assert counter.calls == 2

    def test_log_abs_det_jacobian_recomputes_for_new_pair(self):
        t = CNF(2, flow=small_cnf())
        z1, z2 = torch.randn(3, 2), torch.randn(3, 2)
        x1 = t(z1)
        ladj1 = t.log_abs_det_jacobian(z1, x1)
        x2 = t(z2)
        torch.testing.assert_close(t.log_abs_det_jacobian(z1, x1), ladj1)  # not the cached z2 value
        assert not torch.allclose(t.log_abs_det_jacobian(z2, x2), ladj1)

    def test_svi_step_costs_one_solve(self, monkeypatch):
        pyro.clear_param_store()
        data = torch.randn(20) + 1

        def model():
            loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
            with pyro.plate("data", 20):
                pyro.sample("obs", dist.Normal(loc.sum(), 1.0), obs=data)

        made = []

        def factory(dim):
            made.append(cnf(dim, hidden_dims=[8, 8]))
            return made[-1]

        guide = AutoNormalizingFlow(model, factory)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        svi.step()  # builds the guide
        counter = SolveCounter(made[0].flow, monkeypatch)
        svi.step()
        assert counter.calls == 1


class TestTraceFreeSampling:
    def test_sample_is_one_solve_without_the_trace(self, monkeypatch):
        t = CNF(2, flow=small_cnf())
        counter = SolveCounter(t.flow, monkeypatch)
        d = dist.TransformedDistribution(base(2), [t])
        torch.manual_seed(0)
        x = d.sample((8,))
        assert x.shape == (8, 2) and counter.logdets == [False]
        torch.manual_seed(0)
        traced = d.rsample((8,))  # the same noise, under grad: the solve with the trace
        assert counter.logdets == [False, True]
        torch.testing.assert_close(x, traced.detach(), atol=1e-4, rtol=1e-4)

    def test_log_prob_of_a_sample_is_one_more_solve_and_equals_the_fresh_one(self, monkeypatch):
        flow = small_cnf(rtol=1e-10, atol=1e-10, train_rtol=None, train_atol=None).double()
        t = CNF(2, flow=flow)
        d = dist.TransformedDistribution(base(2, torch.float64), [t])
        counter = SolveCounter(flow, monkeypatch)
        x = d.sample((6,))
        served = d.log_prob(x)
        assert counter.logdets == [False, True]  # the sample, then data -> base from x with the trace
        torch.testing.assert_close(d.log_prob(x), served)  # now cached: no third solve
        assert counter.calls == 2
        fresh = d.log_prob(x.clone())  # not the cached tensor: data -> base with the trace
        assert counter.calls == 3
        torch.testing.assert_close(served, fresh, rtol=1e-7, atol=1e-7)

    def test_under_grad_rsample_and_log_prob_keep_one_traced_solve(self, monkeypatch):
        t = CNF(2, flow=small_cnf())
        counter = SolveCounter(t.flow, monkeypatch)
        d = dist.TransformedDistribution(base(2), [t])
        lp = d.log_prob(d.rsample((5,)))
        lp.sum().backward()
        assert counter.logdets == [True]
        assert all(p.grad is not None for p in t.parameters())

    def test_no_grad_rsample_is_trace_free_unless_switched_off(self, monkeypatch):
        t = CNF(2, flow=small_cnf())
        counter = SolveCounter(t.flow, monkeypatch)
        d = dist.TransformedDistribution(base(2), [t])
        with torch.no_grad():
            d.log_prob(d.rsample((5,)))
            assert counter.logdets == [False, True]
            t.trace_free_without_grad = False
            d.log_prob(d.rsample((5,)))
        assert counter.logdets == [False, True, True]  # one traced solve, as before
        assert t.with_cache(0).trace_free_without_grad is False

    def test_conditional_sample_is_trace_free_and_scores_exactly(self, monkeypatch):
        t = ConditionalCNF(2, 3, flow=small_cnf(context_dim=3, rtol=1e-8, atol=1e-8))
        d = dist.ConditionalTransformedDistribution(base(2), [t]).condition(torch.randn(3))
        counter = SolveCounter(t.flow, monkeypatch)
        x = d.sample((4,))
        lp = d.log_prob(x)
        assert counter.logdets == [False, True] and lp.shape == (4,)
        torch.testing.assert_close(lp, d.log_prob(x.clone()), rtol=1e-4, atol=1e-4)

    def test_log_abs_det_of_another_pair_is_recomputed(self):
        t = CNF(2, flow=small_cnf())
        with torch.no_grad():
            z1, z2 = torch.randn(3, 2), torch.randn(3, 2)
            x1 = t(z1)
            x2 = t(z2)  # the cache now holds (z2, x2)
            torch.testing.assert_close(t.log_abs_det_jacobian(z1, x1), t.flow(z1, reverse=True)[1])
            torch.testing.assert_close(t.log_abs_det_jacobian(z2, x2), t.flow(z2, reverse=True)[1])


@pytest.mark.slow
def test_svi_with_auto_normalizing_flow_decreases_loss():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = torch.randn(50) * 0.5 + 2

    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(loc, scale), obs=data)

    guide = AutoNormalizingFlow(model, partial(pyro_cnf.cnf, hidden_dims=[16, 16]))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO(num_particles=8, vectorize_particles=True))
    losses = [svi.step() for _ in range(60)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 5


@pytest.mark.slow
def test_default_guide_fits_a_funnel_with_its_scale_rate():
    # Neal's funnel in 2-D, x | z ~ N(0, exp(z / 2)): a scale that depends on the other
    # coordinate, which the guide preset's scale rate lets the field hold (KL 0.026-0.048 on seeds
    # 0-2 after 400 steps; without it 0.084-0.199; BENCHMARKS.md, "Scale rate")
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(z / 2)))

    kl = {}
    for rate in (None, 0.0):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        options = {} if rate is None else {"scale_rate": rate}
        guide = AutoNormalizingFlow(model, partial(pyro_cnf.cnf, hidden_dims=[32, 32], **options))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO(num_particles=32, vectorize_particles=True))
        for _ in range(400):
            svi.step()
        with torch.no_grad():  # the evidence is 1, so KL(q || p) = -ELBO
            kl[rate] = Trace_ELBO(num_particles=4096, vectorize_particles=True).loss(model, guide)
    assert kl[None] < 0.08 and kl[None] < 0.6 * kl[0.0]


class TestConditional:
    def test_condition_returns_caching_transform_with_the_contract(self, monkeypatch):
        t = ConditionalCNF(2, 3, flow=small_cnf(context_dim=3))
        ctx = torch.randn(3)
        d = dist.ConditionalTransformedDistribution(base(2), [t]).condition(ctx)
        counter = SolveCounter(t.flow, monkeypatch)
        x = d.rsample((5,))
        lp = d.log_prob(x)
        assert counter.calls == 1 and lp.shape == (5,)
        z, ladj = t.flow(x, ctx.expand(5, 3))
        torch.testing.assert_close(lp, base(2).log_prob(z) + ladj)

    def test_context_broadcasts_against_batch(self):
        t = ConditionalCNF(2, 3, hidden_dims=(8,))
        d = dist.ConditionalTransformedDistribution(base(2), [t])
        ctx = torch.randn(4, 3)
        assert d.condition(ctx).log_prob(torch.randn(4, 2)).shape == (4,)
        assert d.condition(ctx).log_prob(torch.randn(2)).shape == (4,)
        assert d.condition(ctx[0]).log_prob(torch.randn(6, 2)).shape == (6,)

    def test_context_changes_the_density(self):
        t = ConditionalCNF(2, 1, flow=small_cnf(context_dim=1))
        d = dist.ConditionalTransformedDistribution(base(2), [t])
        x = torch.randn(5, 2)
        assert not torch.allclose(d.condition(torch.zeros(1)).log_prob(x), d.condition(torch.ones(1)).log_prob(x))

    def test_conditional_factory(self):
        t = pyro_cnf.conditional_cnf(2, 3, hidden_dims=[8])
        assert isinstance(t, ConditionalCNF) and t.flow.vector_field.hidden_dims == (8,)


def test_log_det_of_a_cached_pair_survives_another_solve():
    t = CNF(2, flow=small_cnf()).double()
    z = torch.randn(4, 2, dtype=torch.float64)
    x = t(z)
    served = t.log_abs_det_jacobian(z, x).detach().clone()
    t._inverse(3 * torch.randn(4, 2, dtype=torch.float64))  # a direct solve, as Pyro's Flatten makes
    torch.testing.assert_close(t.log_abs_det_jacobian(z, x).detach(), served, rtol=0, atol=0)
    torch.testing.assert_close(served, t.flow(z, reverse=True)[1].detach(), rtol=1e-4, atol=1e-4)


class TestFieldDefaults:
    """Guides (``CNF``, ``cnf``) start from the "guide" preset, density fitting (the nflows
    adapter) from "density", conditional densities from "conditional"; ODENet's defaults
    are the conditional preset's field."""

    @staticmethod
    def settings(field):
        return {name: getattr(field, name) for name in PRESETS["guide"].field if name != "time_gate_scale"}

    @staticmethod
    def preset(name):
        return {k: v for k, v in PRESETS[name].field.items() if k != "time_gate_scale"}

    def test_guides_default_to_the_guide_preset(self):
        assert self.settings(CNF(2).flow.vector_field) == self.preset("guide")
        assert CNF(2).flow.preset == "guide"
        # other widths keep the rest of the guide field
        assert self.settings(cnf(3, [8]).flow.vector_field) == {**self.preset("guide"), "hidden_dims": (8,)}

    def test_density_fitting_defaults_to_the_density_presets(self):
        assert self.settings(pyro_cnf.CNFTransform(2).flow.vector_field) == self.preset("density")
        conditional = (pyro_cnf.CNFTransform(2, context_dim=1), ConditionalCNF(2, 1))
        for field in (ODENet(2), *(c.flow.vector_field for c in conditional)):
            assert self.settings(field) == self.preset("conditional")
        assert self.settings(CNF(2, preset="density").flow.vector_field) == self.preset("density")

    def test_explicit_settings_win(self):
        assert CNF(2, activation="tanh").flow.vector_field.activation == "tanh"
        assert CNF(2, input_gain=1.0).flow.vector_field.input_gain == 1.0
        assert CNF(2, scale_rate=0.0).flow.vector_field.linears[-1].out_features == 2
        own = ContinuousFlow(ODENet(2, (8,), activation="elu"))
        assert CNF(2, flow=own).flow.vector_field.activation == "elu"
        with pytest.raises(ValueError, match="not both"):
            CNF(2, flow=own, zero_init=False)

    def test_guide_field_is_unbounded_and_starts_at_identity(self):
        # what the guide default is for: a field that can keep growing with |x| (a tanh
        # field's output is bounded by the last layer's weights), from the identity map
        torch.manual_seed(0)
        guide, density = CNF(2, zero_init=False).flow.vector_field, ODENet(2, zero_init=False)
        x, t = torch.tensor([[1e3, -1e3]]), torch.tensor(0.5)
        bound = density.linears[-1].weight.abs().sum(1) + density.linears[-1].bias.abs()
        assert (density(t, x).abs() <= bound + 1e-4).all()
        assert guide(t, 10 * x).norm() > 5 * guide(t, x).norm()
        y = torch.randn(4, 2)
        assert torch.equal(CNF(2)(y), y)
