"""The nflows adapter: conventions, composition inside Flow, conditioning."""

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import (
    CompositeTransform,
    InverseTransform,
    MaskedAffineAutoregressiveTransform,
    ReversePermutation,
)

from pyro_cnf import CNFFlow, CNFTransform, ContinuousFlow, ODENet
from pyro_cnf.nflows import forward_without_logdet, inverse_without_logdet


def small(d=2, context_dim=None, **kw):
    torch.manual_seed(0)
    field = ODENet(d, (16, 16), context_dim=context_dim or 0, zero_init=False)
    return CNFTransform(d, context_dim=context_dim, flow=ContinuousFlow(field, **kw))


def test_stacked_with_maf_in_flow():
    torch.manual_seed(0)
    cnf = small(4)
    maf = MaskedAffineAutoregressiveTransform(features=4, hidden_features=8)
    flow = Flow(CompositeTransform([cnf, ReversePermutation(4), maf]), StandardNormal([4]))
    x = torch.randn(6, 4)
    lp = flow.log_prob(x)
    # the same number by hand: log p(x) = log N(maf(perm(cnf(x)))) + sum of log-dets
    z1, l1 = cnf(x)
    z2, l2 = maf(z1.flip(-1))
    torch.testing.assert_close(lp, StandardNormal([4]).log_prob(z2) + l1 + l2)
    lp.mean().backward()
    assert all(p.grad is not None for p in cnf.parameters())
    state = torch.get_rng_state()
    with torch.no_grad():
        samples = flow.sample(7)
        torch.set_rng_state(state)
        noise = StandardNormal([4]).sample(7)  # the draw flow.sample started from
        # sampling inverts the forward map: the samples map back to exactly that draw
        torch.testing.assert_close(flow.transform_to_noise(samples), noise, rtol=1e-3, atol=1e-3)


def test_context_rows_must_match_inputs():
    t = small(2, context_dim=3)
    with pytest.raises(ValueError, match="rows"):
        t(torch.randn(5, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        t(torch.randn(5, 2, 1))


class FlowSolves:
    """Records the ``logdet`` argument of every solve of a ContinuousFlow."""

    def __init__(self, flow, monkeypatch):
        self.logdets = []
        original = flow.forward

        def counted(*args, **kwargs):
            self.logdets.append(kwargs.get("logdet", True))
            return original(*args, **kwargs)

        monkeypatch.setattr(flow, "forward", counted)


class TestTraceFreeSampling:
    def test_cnf_flow_samples_with_one_trace_free_solve_and_the_plain_flows_points(self, monkeypatch):
        t = small(rtol=1e-8, atol=1e-8)
        plain, trace_free = Flow(t, StandardNormal([2])), CNFFlow(t, StandardNormal([2]))
        solves = FlowSolves(t.flow, monkeypatch)
        torch.manual_seed(1)
        expected = plain.sample(6)
        torch.manual_seed(1)
        got = trace_free.sample(6)
        assert solves.logdets == [True, False]  # nflows' inverse integrates the trace; CNFFlow does not
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def test_conditional_and_stacked_sampling_matches_the_plain_flow(self, monkeypatch):
        torch.manual_seed(0)
        cnf = small(3, context_dim=2, rtol=1e-8, atol=1e-8)
        maf = MaskedAffineAutoregressiveTransform(features=3, hidden_features=8, context_features=2)
        transform = CompositeTransform([cnf, ReversePermutation(3), maf])
        plain, trace_free = Flow(transform, StandardNormal([3])), CNFFlow(transform, StandardNormal([3]))
        ctx = torch.randn(4, 2)
        solves = FlowSolves(cnf.flow, monkeypatch)
        with torch.no_grad():
            torch.manual_seed(2)
            expected = plain.sample(5, context=ctx)
            torch.manual_seed(2)
            got = trace_free.sample(5, context=ctx)
        assert got.shape == (4, 5, 3) and solves.logdets == [True, False]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def test_log_probs_stay_exact(self):
        t = small(2, context_dim=3)
        flow = CNFFlow(t, StandardNormal([2]))
        x, ctx = torch.randn(5, 2), torch.randn(5, 3)
        z, ladj = t.flow(x, ctx)
        torch.testing.assert_close(flow.log_prob(x, context=ctx), StandardNormal([2]).log_prob(z) + ladj)
        samples, log_prob = flow.sample_and_log_prob(3, context=ctx)
        again = flow.log_prob(samples.reshape(-1, 2), context=ctx.repeat_interleave(3, 0)).reshape(5, 3)
        torch.testing.assert_close(log_prob, again, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(flow.transform_to_noise(x, context=ctx), z, rtol=1e-4, atol=1e-4)

    def test_without_logdet_walks_composites_and_inverse_transforms(self, monkeypatch):
        torch.manual_seed(0)
        cnf = small(2)
        maf = MaskedAffineAutoregressiveTransform(features=2, hidden_features=8)
        transform = CompositeTransform([ReversePermutation(2), InverseTransform(cnf), maf])
        solves = FlowSolves(cnf.flow, monkeypatch)
        z = torch.randn(7, 2)
        with torch.no_grad():
            torch.testing.assert_close(inverse_without_logdet(transform, z), transform.inverse(z)[0],
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(forward_without_logdet(transform, z), transform(z)[0], rtol=1e-4, atol=1e-4)
        assert solves.logdets == [False, True, False, True]
        assert cnf.inverse_without_logdet(z).shape == cnf.forward_without_logdet(z).shape == (7, 2)
