"""The nflows adapter: conventions, composition inside Flow, conditioning."""

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

from pyro_cnf import CNFTransform, ContinuousFlow, ODENet
from tests.fields import LinearField, random_matrix


def small(d=2, context_dim=None, **kw):
    torch.manual_seed(0)
    field = ODENet(d, (16, 16), context_dim=context_dim or 0, zero_init=False)
    return CNFTransform(d, context_dim=context_dim, flow=ContinuousFlow(field, **kw))


def test_forward_maps_data_to_noise_on_linear_field():
    A = random_matrix(3)
    t = CNFTransform(3, flow=ContinuousFlow(LinearField(A), trace="exact", rtol=1e-10, atol=1e-10))
    x = torch.randn(4, 3, dtype=torch.float64)
    z, logabsdet = t(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(A).t())
    torch.testing.assert_close(logabsdet, torch.trace(A).expand(4))
    x2, back = t.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(back, -logabsdet)


def test_logabsdet_matches_slogdet():
    t = small(rtol=1e-10, atol=1e-10).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    _, logabsdet = t(x)
    assert logabsdet.shape == (3,)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0][0], x[i])
        torch.testing.assert_close(logabsdet[i], torch.linalg.slogdet(jac)[1], rtol=1e-7, atol=1e-7)


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
    with torch.no_grad():
        samples = flow.sample(7)
    assert samples.shape == (7, 4) and torch.isfinite(samples).all()
    # sampling inverts the forward map
    with torch.no_grad():
        torch.testing.assert_close(flow.transform_to_noise(samples).shape, torch.Size([7, 4]))


def test_conditional_flow_log_prob_and_sample():
    t = small(2, context_dim=3)
    flow = Flow(t, StandardNormal([2]))
    x, ctx = torch.randn(5, 2), torch.randn(5, 3)
    lp = flow.log_prob(x, context=ctx)
    z, ladj = t.flow(x, ctx)
    torch.testing.assert_close(lp, StandardNormal([2]).log_prob(z) + ladj)
    assert flow.sample(4, context=ctx).shape == (5, 4, 2)


def test_context_rows_must_match_inputs():
    t = small(2, context_dim=3)
    with pytest.raises(ValueError, match="rows"):
        t(torch.randn(5, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        t(torch.randn(5, 2, 1))
